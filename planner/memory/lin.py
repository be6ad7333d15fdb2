"""Bytes as linear forms of the batch shape (``Lin``) and the element sizes of a step's tensors
(``Precision``): the vocabulary every activation term (``planner.memory.activations``, ``planner.memory.moe``) is
written in."""

from __future__ import annotations

from dataclasses import dataclass

from qplan.planner.model.weights import QuantSettings
from qplan.planner.vocab import BYTES


@dataclass(frozen=True)
class Lin:
    """``const + tok * T + seq * s + quad * T * s + rows * T / s`` bytes (T = batch * seq tokens, s = sequence
    length: ``seq`` for tensors broadcast over the batch, ``quad`` for eager attention scores, ``rows`` for tensors
    of a fixed length per row, such as prompt tuning's virtual tokens)."""

    const: int = 0
    tok: int = 0
    seq: int = 0
    quad: int = 0
    rows: int = 0

    def __add__(self, o: "Lin") -> "Lin":
        return Lin(self.const + o.const, self.tok + o.tok, self.seq + o.seq, self.quad + o.quad, self.rows + o.rows)

    def __mul__(self, k: int) -> "Lin":
        return Lin(self.const * k, self.tok * k, self.seq * k, self.quad * k, self.rows * k)

    __rmul__ = __mul__

    def at(self, T: int, s: int) -> int:
        return self.const + self.tok * T + self.seq * s + self.quad * T * s + (self.rows * (T // s) if s else 0)


ZERO = Lin()


def most(forms: tuple, T: int, s: int) -> int:
    """The largest of several moments' forms at ``T`` tokens (0 for none): a term whose peak moment moves with the
    batch shape (Cut Cross Entropy's ``24 n`` against ``16 n + 4 V``) is a tuple of forms, each a ``Lin`` or anything
    else with ``at(T, s)`` (``loss.Tiled``: a buffer capped at a tile)."""
    return max((f.at(T, s) for f in forms), default=0)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of the tensors a step makes.

    * ``amp``: autocast on (Trainer ``bf16=True``/``fp16=True`` -> accelerate wraps the forward in
      ``torch.autocast``); ``c``: what the matmuls produce — autocast's lower precision, or without autocast
      the weights' own dtype: 4 for fp32 weights, 2 for a pure 16-bit step (``--quant bf16 --compute-dtype
      fp32``: bf16 weights, no autocast, as PEFT's benchmark harness and torchtune train). Terms that depend on
      16-bit kernels (flash attention, a 16-bit copy of the softmax) ask ``c != 4``; terms that depend on
      autocast's casts ask ``amp``.
    * ``R``: the residual stream: embeddings output, norm outputs.  ``prepare_model_for_kbit_training``
      casts embeddings and norms to fp32, so the whole stream runs in fp32 (4); otherwise the load dtype.
    * ``M``: outputs of the projections feeding the MLP activation.  bitsandbytes' ``Linear4bit``
      casts its output back to the input dtype (``out.to(inp_dtype)``), so k-bit models keep ``R``;
      plain ``nn.Linear`` under autocast gives ``c``.
    """

    amp: bool
    c: int
    R: int
    M: int
    kbit: bool
    #: the compute dtype's name (``QuantSettings.compute_dtype``)
    compute: str = "bfloat16"

    @property
    def low(self) -> bool:
        """The matmuls run in 16 bits (autocast, or a pure 16-bit step): flash attention, 16-bit softmax copies."""
        return self.c != 4


def precision(q: QuantSettings) -> Precision:
    amp = q.compute_dtype in ("bfloat16", "float16")
    R = BYTES[q.unquantized_dtype]
    c = BYTES[q.compute_dtype] if amp else R
    M = R if (q.kbit or not amp) else c
    return Precision(amp, c, R, M, q.kbit, q.compute_dtype)


