"""DoRA's activations (``use_dora``): what PEFT 0.21's ``DoraLinearLayer.forward`` keeps beyond plain LoRA.

Per adapted module, with ``c`` the compute dtype (the weights' dtype in a pure 16-bit step) and ``t1`` the dtype of
the module's LoRA input (PEFT's cast to the fp32 adapter dtype; bitsandbytes' layers keep the stream dtype under
autocast):

* ``result_dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling``: the two products
  save ``base_result`` and ``lora_result`` (``lora_B``'s output, which plain LoRA only scales and adds): two
  ``c out T`` tensors (``lora_result`` is fp32 in a pure 16-bit step: the branch runs in the adapters' dtype). The
  fp32 products, their sum and the cast back are transients;
* the detached weight norm ``weight_norm`` (``t1 out``: the weight is cast ``.to(x.dtype)`` before the norm),
  saved by ``magnitude / weight_norm``; that quotient ``mag_norm_scale`` (``4 out``), saved by its product with
  ``lora_result``; ``mag_norm_scale - 1`` (``4 out``), saved by its product with ``base_result`` when that needs
  grad (not for layer 0's q/k/v without checkpointing: their input, the embeddings, needs none);
* with dropout during training, ``base_result`` is recomputed as ``F.linear(dropout(x), weight)`` from the
  (dequantized) weight, whose compute-dtype copy that matmul saves for the input gradient: ``c in out`` more per
  module whose input needs grad — the largest DoRA term (the whole layer's weights once more, in 16 bits).

Checked to the byte against the traced step's saved tensors (tiny Llama, bf16 and nf4, dropout 0 and 0.05) and
within the planner's tolerance on full-size models (``tests/planner/test_memory.py``)."""

from __future__ import annotations

from typing import Any

from qplan.planner.memory.lin import Lin, Precision


def dora_activation(branches: list[Any], p: Precision, dropout: float, first: bool, site_dtype: dict[str, int]) -> Lin:
    """Per layer: DoRA's saved bytes beyond plain LoRA (module docstring). ``branches``: the layer's adapted linear
    groups (``activations.Branch``); ``first``: layer 0 without checkpointing; ``site_dtype``: the dtype bytes each
    site's input has."""
    tok = const = 0
    for br in branches:
        grad_in = not (first and br.site == "attn_in")
        t1 = site_dtype[br.site] if (br.kbit and p.amp) else 4
        tok += (p.c + (p.c if p.amp else 4)) * br.out_features * br.per_layer
        small = t1 + 4 + (4 if grad_in else 0)
        weight = p.c * br.in_features if (dropout > 0 and grad_in) else 0
        const += (small + weight) * br.out_features * br.per_layer
    return Lin(tok=tok, const=const)
