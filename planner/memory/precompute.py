"""The pass before training of TRL's ``precompute_ref_log_probs`` (``--precompute-ref-log-probs``, DPO and KTO).

TRL 1.16's ``DPOTrainer.__init__`` (``KTOTrainer``'s too) runs ``compute_ref_log_probs`` over the training set before
training: batches of ``precompute_ref_batch_size`` pairs (``per_device_train_batch_size`` when unset), padded as the
training batches are, each under ``no_grad`` with checkpointing off, the adapters disabled (PEFT; the policy itself
without PEFT) and ``accelerator.autocast()``, through the fused LM head. The optimizer does not exist yet: the device
holds the weights and the adapters, the batch and the forward. The step then reads the log-probabilities from its
batch: no reference forward, and with full fine-tuning no reference model (``profiles.reference_weights``).

Derived from the code that runs (TRL's ``compute_ref_log_probs``, transformers' Llama-family layers, PEFT's disabled
``lora.Linear``, torch's autocast) and checked against that method traced on meta (``observe.trace.precompute``,
tests/planner/test_precompute.py). Notation as in ``planner.memory.terms``.
"""

from __future__ import annotations

from typing import Any

from qplan.planner.memory.activations import precision
from qplan.planner.memory.full import cached_weight_casts
from qplan.planner.memory.generation import layer_forward_bytes, stream_bytes
from qplan.planner.memory.lin import most
from qplan.planner.memory.masks import padding_mask_activation
from qplan.planner.memory.terms import dequant_temp_bytes, dims
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings


def precompute_pass_bytes(spec: ModelSpec, q: QuantSettings, logits_fwd: tuple[Any, ...], rows: int, s: int,
                          objective: str, kernels: str = "cuda", full: bool = False, padded: bool = False
                          ) -> dict[str, int]:
    """One batch of the pass, beyond the weights and adapters: ``rows`` rows (DPO: ``2 x`` the pairs) of ``s``
    positions, ``T = rows s`` tokens, at its largest moment (``peak``) and at each:

    * ``inputs``: the collated ``input_ids``, ``attention_mask`` and ``completion_mask`` (int64, ``24 T``; KTO's batch
      holds its KL rows' three as wide: ``48 T``), alive through the pass;
    * ``head``: the labels ``compute_ref_log_probs`` makes (``input_ids.masked_fill``: int64, ``8 T``), the final
      norm's output (``R h T``) and the fused head's forward at ``T`` rows (``loss.trl_terms``' forward, the step's
      ``logits_fwd``: the valid rows' copy, the tile buffer, the casts, the statistics). KTO runs the KL rows after the
      batch's: the first forward's log-probabilities (fp32, ``4 T``) and the KL labels (``8 T``) are alive at the
      second head;
    * ``layer``: a decoder layer's forward without grad (``generation.layer_forward_bytes`` with no adapter, and
      ``stream_bytes`` in the residual dtype ``R``), beside the labels. Its projections' outputs are in the compute
      dtype under autocast, but bitsandbytes returns its input's dtype (a k-bit base's layer tensors are ``R``: fp32
      after ``prepare_model_for_kbit_training``). On a GPU a k-bit projection's matmul holds its input cast to the
      compute dtype, the dequantized weight (``dequant_temp_bytes``) and its compute-dtype output, beside the
      previous projection's output (the MLP's ``up``: ``lay i T + c (i + h) T + dequant``).

    A padded batch (``padded``) has the 4-D bool attention mask the model's forward makes and keeps through its layers
    (``masks.padding_mask_activation``'s kept term), at the layer moment.

    ``full``: the policy's own weights (full fine-tuning) require grad, so autocast caches their casts through the
    pass as it does through a step (``full.cached_weight_casts``; counted whole at both moments: the last layer's
    moment is within its own weights of that).
    """
    d = dims(spec)
    p = precision(q)
    T = rows * s
    kto = objective == "kto"
    inputs = (48 if kto else 24) * T
    cache = cached_weight_casts(spec, p, q.unquantized_dtype) if full else 0
    head = 8 * T + p.R * d.h * T + most(logits_fwd, T, s) + (12 * T if kto else 0) + cache
    lay = p.R if q.kbit else p.c
    inner = layer_forward_bytes(d, T, lay, lay, frozenset())
    if q.kbit and kernels == "cuda":  # a projection's matmul: the input cast, the weight dequantized, the output
        inner = max(inner, lay * d.i * T + p.c * (d.i + d.h) * T + dequant_temp_bytes(spec, q, p.c))
    mask = padding_mask_activation(spec, p)[0].at(T, s) if padded else 0  # the model's forward keeps it
    layer = 8 * T + stream_bytes(d, p.R, T) + inner + cache + mask
    return {"inputs": inputs, "head": inputs + head, "layer": inputs + layer, "peak": inputs + max(head, layer)}
