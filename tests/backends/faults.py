"""TrainerCallbacks that inject failures into a real run (loaded by the worker through
$QPLAN_CALLBACKS, e.g. ``QPLAN_CALLBACKS=faults:OomAtStep2`` with this folder on PYTHONPATH)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from transformers import TrainerCallback


class OomAtStep2(TrainerCallback):
    """Raise torch.OutOfMemoryError at the start of step 2 (as an allocation failure would)."""

    def on_step_begin(self, args, state, control, **kw):
        import torch

        if state.global_step + 1 == 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 20.00 MiB")


class StallAtStep2(TrainerCallback):
    """At step 2, touch $QPLAN_TEST_MARKER and wait (up to 120 s) so a test can press Ctrl-C."""

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step + 1 == 2:
            Path(os.environ["QPLAN_TEST_MARKER"]).write_text("at step 2")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.05)


class OomOnRank1AtStep2(TrainerCallback):
    """Rank 1 of a multi-process run raises torch.OutOfMemoryError at the start of step 2; the
    other ranks go on (and block in the next collective until the launcher ends them)."""

    def on_step_begin(self, args, state, control, **kw):
        import torch

        if state.global_step + 1 == 2 and os.environ.get("RANK") == "1":
            raise torch.OutOfMemoryError("simulated: CUDA out of memory on rank 1")


class KillNode1AtStep3(TrainerCallback):
    """The ranks of node 1 (``QPLAN_NODE_RANK``) kill their node at the start of step 3: its launcher (torchrun's
    agent, their parent) and themselves, with SIGKILL, as a machine that loses power or is taken by the kernel."""

    def on_step_begin(self, args, state, control, **kw):
        import signal

        if state.global_step + 1 == 3 and os.environ.get("QPLAN_NODE_RANK") == "1":
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
