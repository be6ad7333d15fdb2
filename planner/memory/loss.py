"""The loss's terms: what computing the loss adds at the end of the forward and at the start of the backward.

* ``full``: transformers' ``ForCausalLMLoss`` over the head's ``T x V`` logits (``logits_terms``);
* ``unsloth``: Unsloth's chunked cross-entropy (no fp32 copies of the logits);
* ``cce``: Cut Cross Entropy (``cce_terms``) — the loss from the final hidden states and the head's weight, never
  the logits: Apple's ml-cross-entropy as axolotl's ``CutCrossEntropyPlugin`` runs it (the fork
  axolotl-ai-cloud/ml-cross-entropy at 5f0c7a7, which axolotl 067b021c8's plugin pins).

Every term is a ``Lin`` (``planner.memory.lin``); ``T`` tokens, ``V`` the head's rows, ``h`` the hidden size.
"""

from __future__ import annotations

from qplan.planner.memory.lin import Lin, precision
from qplan.planner.memory.terms import dims
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings

#: what each loss kind is called where a plan says it (``vocab.LOSSES`` plus the Unsloth profile's own)
LOSS_KINDS = ("full", "cce", "unsloth")


def loss_terms(spec: ModelSpec, q: QuantSettings, loss: str = "full") -> dict[str, tuple[Lin, ...]]:
    """The loss's bytes at the end of the forward (``forward``) and the start of the backward (``backward``), on top
    of the saved activations, each the largest of a few moments (``lin.most``): ``logits_terms`` for ``full`` and
    ``unsloth``, ``cce_terms`` for ``cce``."""
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, got {loss!r}")
    if loss == "cce":
        return cce_terms(spec, q)
    return {k: (v,) for k, v in logits_terms(spec, q, chunked=loss == "unsloth").items()}


def logits_terms(spec: ModelSpec, q: QuantSettings, chunked: bool = False) -> dict[str, Lin]:
    """Logits and loss (transformers ``ForCausalLMLoss``: ``logits.float()``, ``cross_entropy``).

    * end of the forward: the head's ``c T V`` logits, the fp32 copy ``4 T V`` (freed after
      ``log_softmax``) or accelerate's ``convert_to_fp32`` copy of the outputs, and
      ``log_softmax``'s fp32 output ``4 T V`` (saved): ``(c + 8) T V`` (``8 T V`` in fp32);
    * start of backward (Trainer has dropped the outputs): ``log_softmax``'s output, the
      gradient ``nll_loss`` writes into it, and ``log_softmax``'s input gradient, three fp32
      ``T V``: ``12 T V`` — the peak of most plans.
    Unsloth's chunked cross-entropy never materialises the fp32 copies: ``c T V`` at both.
    Gemma-2's final softcapping adds its saved ``tanh`` output, ``c T V``.
    """
    d = dims(spec)
    p = precision(q)
    # Gemma-2 ``final_logit_softcapping``: ``tanh(logits / cap) * cap`` keeps the tanh output
    cap = p.c * d.V if d.final_softcap else 0
    if chunked:
        return {"forward": Lin(tok=p.c * d.V + cap), "backward": Lin(tok=p.c * d.V + cap)}
    fwd = (p.c + 8) * d.V if p.low else 8 * d.V
    return {"forward": Lin(tok=fwd + cap), "backward": Lin(tok=12 * d.V + cap)}


def cce_terms(spec: ModelSpec, q: QuantSettings) -> dict[str, tuple[Lin, Lin]]:
    """Cut Cross Entropy's bytes (axolotl-ai-cloud/ml-cross-entropy 5f0c7a7: ``transformers/utils.apply_lce``,
    ``cce.cce_linear_cross_entropy`` / ``LinearCrossEntropyFunction``, ``cce_lse_forward``, ``indexed_dot``,
    ``cce_backward``), with ``n`` target rows (``B (s - 1)`` after the shift; planned as ``T``, at most 28 B bytes
    high).  The final hidden state ``e`` (the final norm's output, ``R h T``) and the head's weight are passed as
    they are: the fork casts ``e`` only for an fp32 ``e`` with a bf16 head, which qplan's dtypes never make (both
    are the unquantized dtype).

    * end of the forward — the larger of ``_build_flat_valids``' transients (``nonzero`` of the ``n`` valid rows:
      int64 ``16 n`` and its int32 copy ``8 n``: ``24 n``) and the loss kernels' tensors (``valids``, the int32
      copy's row sums, int64 by torch's promotion: ``8 n``,
      ``lse`` fp32 ``4 n``, ``logit_avg`` fp32 ``4 V`` for the gradient filter, the target logits ``neg_dot``
      fp32 ``4 n``, Gemma-2's softcapped copy of them ``4 n``): the larger of ``24 n`` and ``16 n + 4 V``; ``e`` itself is counted
      by the loss-time activations (``loss_time_activation``);
    * start of the backward — the saved ``e`` (``R h T``, now kept by the loss), ``valids`` and ``lse`` (``12 n``),
      ``logit_avg`` (``4 V``), and the larger of ``sort_logit_avg``'s ``argsort`` (int64 ``8 V`` and its int32
      copy ``4 V``) and the backward kernel's ``vocab_ordering`` (``4 V``) with ``de`` (``zeros_like(e)``,
      ``R h T``) and its locks (int32, ``ceil(n / 128) x ceil(h / 64)``: planned per token, rounded up).
      The head is frozen (a trained head is refused), so there is no weight gradient.
    """
    d = dims(spec)
    p = precision(q)
    softcap = 4 if d.final_softcap else 0
    fwd = (Lin(tok=24), Lin(tok=16 + softcap, const=4 * d.V))
    locks = -(-4 * -(-d.h // 64) // 128)  # bytes of de's locks per row: an int32 per 128 rows and 64 columns
    saved = Lin(tok=p.R * d.h + 12, const=4 * d.V)
    bwd = (saved + Lin(const=12 * d.V), saved + Lin(const=4 * d.V, tok=p.R * d.h + locks))
    return {"forward": fwd, "backward": bwd}
