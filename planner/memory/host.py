"""Host (CPU RAM) bytes a training step keeps outside the GPU: ``prediction.host``.

One pure function per term, integers in, integer bytes out. What is counted is what the step
itself moves to host memory; the Python process, the CUDA/PyTorch libraries and the model load
(safetensors are memory-mapped and streamed to the device tensor by tensor) are not.

* ``offloaded_checkpoints`` — Unsloth's ``use_gradient_checkpointing="unsloth"``
  (unsloth_zoo 2026.10.9 ``gradient_checkpointing.py``, ``Unsloth_Offloaded_Gradient_Checkpointer``:
  ``saved_hidden_states = hidden_states.to("cpu", non_blocking=True)``): every decoder layer's input
  hidden states, ``L * T * h`` elements in the residual stream's dtype, live in host RAM from that
  layer's forward until its backward recomputation. On a CPU run nothing is offloaded (the device
  is the host): 0.
* ``paged_optimizer`` — bitsandbytes' paged optimizers allocate their large states in CUDA unified
  memory (``cudaMallocManaged``), which the driver pages out to host RAM when the GPU runs short:
  at most all of them (the plan's ``optimizer_paged`` bytes) can sit in host RAM.

``peak`` is their sum: both are alive together during the backward pass.
Derived from source: no GPU measured these (a CPU run has neither).
"""

from __future__ import annotations

from qplan.planner.memory.terms import Dims
from qplan.planner.model.weights import QuantSettings
from qplan.planner.vocab import BYTES


def offloaded_checkpoint_bytes(d: Dims, q: QuantSettings, batch_size: int, seq_len: int, grad_ckpt: str,
                               kernels: str = "cuda") -> int:
    """Unsloth checkpointing: ``L * b * s * h * R`` bytes (``R``: residual-stream dtype bytes, the
    unquantized dtype: fp32 after the k-bit upcast, else the load dtype); 0 otherwise or on a CPU."""
    if grad_ckpt != "unsloth" or kernels == "cpu":
        return 0
    return d.L * batch_size * seq_len * d.h * BYTES[q.unquantized_dtype]


def paged_optimizer_host_bytes(optimizer_paged: int) -> int:
    """Paged optimizer states (``paged_adamw_*``): all of them, at most, paged out to host RAM."""
    return int(optimizer_paged)


def host_prediction(d: Dims, q: QuantSettings, batch_size: int, seq_len: int, grad_ckpt: str,
                    optimizer_paged: int, kernels: str = "cuda", offloaded: int | None = None) -> dict[str, int]:
    """``prediction.host``: each term and their sum ``peak`` (bytes of host RAM); ``offloaded``: an
    Unsloth plan's pinned offload pool (``unsloth_memory.offload_host_bytes``), which replaces the
    ``L b s h`` estimate."""
    terms = {
        "offloaded_checkpoints": offloaded if offloaded is not None else
        offloaded_checkpoint_bytes(d, q, batch_size, seq_len, grad_ckpt, kernels),
        "paged_optimizer": paged_optimizer_host_bytes(optimizer_paged),
    }
    return {**terms, "peak": sum(terms.values())}
