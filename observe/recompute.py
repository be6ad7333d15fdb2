"""The one checkpoint wrapper: tell the tracker when a checkpointed layer recomputes its forward.

transformers (and Unsloth) run a checkpointed decoder layer as
``layer._gradient_checkpointing_func(fn, *args)`` (``torch.utils.checkpoint.checkpoint`` with
``use_reentrant=False``); ``fn`` runs once in the forward and again inside the backward pass.
``wrap_recompute`` wraps every such function of a model so that the second run is a
recomputation for the tracker (``begin_recompute``/``end_recompute``): what it makes is an
activation when autograd saves it or it outlives the recomputation. ``around`` (called at
forward time) may return a context factory entered around every run of ``fn`` — the meta trace
re-enters the forward's emulated autocast there, as ``torch.utils.checkpoint`` does on real
devices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any


def wrap_recompute(model: Any, tracker: Callable[[], Any],
                   around: Callable[[], Callable[[], Any]] | None = None) -> Callable[[], None]:
    """Wrap the model's checkpoint functions; ``tracker()`` gives the current tracker (or None).
    Returns a function that restores the originals."""
    undo: list[tuple[Any, Any]] = []
    for m in model.modules():
        orig = m.__dict__.get("_gradient_checkpointing_func")
        if orig is None or getattr(orig, "_qplan_wrapped", False):
            continue

        def ckpt(fn, *args, _orig=orig, **kw):
            enter = around() if around is not None else None

            def body(*a, **k):
                tr = tracker()
                recomputing = tr is not None and tr.phase == "backward"
                prev = tr.begin_recompute() if recomputing else None
                try:
                    with enter() if enter is not None else contextlib.nullcontext():
                        return fn(*a, **k)
                finally:
                    if recomputing:
                        tr.end_recompute(prev)

            return _orig(body, *args, **kw)

        ckpt._qplan_wrapped = True
        m._gradient_checkpointing_func = ckpt
        undo.append((m, orig))

    def restore() -> None:
        for mod, fn in undo:
            mod._gradient_checkpointing_func = fn
        undo.clear()

    return restore
