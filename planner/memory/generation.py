"""GRPO's generation phase (``--objective grpo``): what transformers' ``generate`` holds while TRL 1.16's
``GRPOTrainer`` samples the completions of a generation batch (``_generate_single_turn``: ``unwrapped_model.generate``
under ``torch.no_grad()``, no autocast, transformers 5.23 ``GenerationMixin._sample`` with a ``DynamicCache``).

``N`` sequences (the generation batch on this rank: ``per_device_train_batch_size x steps_per_generation``), their
prompts left-padded to ``P`` tokens, ``C`` completion tokens each (``max_completion_length``: planned to the end, as
when no row stops early). The model runs once over the prompts (the prefill, ``N P`` tokens), then ``C - 1`` times over
one token per row (decode); each forward is followed by sampling. The hidden states are in the weights' dtype ``R``
(bitsandbytes returns its input's dtype; no autocast), so the cache is too; LoRA's fp32 factors (``a`` bytes) see an
``a``-byte copy of their input (PEFT's ``_cast_input_dtype``) and add their ``a``-byte product to the base output.

Every function is pure and returns bytes; the moments are checked against a tracked real ``generate`` and a tracked
``GRPOTrainer`` run on the CPU (``tests/planner/test_grpo.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from qplan.planner.memory.terms import Dims, dims
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import BYTES, QuantSettings

#: the model types whose generation qplan plans (a dense decoder with a gated MLP, every layer full attention; a
#: sliding-window or linear-attention layer keeps another cache, an MoE layer other transients)
GENERATION_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class GenerationShape:
    """One generation batch: ``sequences`` rows, ``prompt`` tokens (the longest prompt; the others are left-padded to
    it) and ``completion`` new tokens each."""

    sequences: int
    prompt: int
    completion: int

    @property
    def positions(self) -> int:
        """Cached positions after the last forward: ``P + C - 1`` (the last sampled token is never fed back)."""
        return self.prompt + self.completion - 1


def kv_cache_bytes(d: Dims, R: int, sequences: int, positions: int) -> int:
    """The key/value cache of ``sequences`` rows of ``positions`` tokens: ``2 x L x kv_heads x head_dim x R x
    sequences x positions`` (transformers' ``DynamicLayer`` keeps one key and one value tensor a layer, ``[N,
    kv_heads, positions, head_dim]``, in the projections' output dtype)."""
    return 2 * d.L * d.kv * R * sequences * positions


def lora_linear_bytes(n: int, fan_in: int, fan_out: int, R: int, a: int, lora: bool, mask: int = 0) -> int:
    """A linear layer's forward without grad at its largest (PEFT 0.21 ``lora.Linear.forward``): the base output
    ``R n fan_out``; with LoRA the input cast to the factors' dtype (``a n fan_in`` when ``a != R``), then ``lora_B``'s
    output and its product by the scaling (``2 a n fan_out``; the first is freed when the sum is made, which is as
    large: ``max(a, R)``). LoRA dropout above 0 runs in generation too (the Trainer's model is in train mode): its
    output (``a n fan_in``) and its mask, ``mask`` bytes an element (CUDA's fused ``native_dropout``: a bool mask, 1;
    the CPU's ``empty_like(x).bernoulli_()``: ``a``; 0: no dropout)."""
    if not lora:
        return R * n * fan_out
    cast = a * n * fan_in if a != R else 0
    dropped = (a + mask) * n * fan_in if mask else 0
    return cast + R * n * fan_out + max(dropped, 2 * max(a, R) * n * fan_out)


def layer_forward_bytes(d: Dims, n: int, R: int, a: int, lora: frozenset[str], mask: int = 0) -> int:
    """The largest moment inside one decoder layer's forward without grad over ``n`` tokens, beyond the residual
    stream (``stream_bytes``): the MLP (``act(gate(x)) * up(x)``, then ``down``: the gate's activation alive
    through ``up``; the product through ``down``) or the attention's projections (q's output alive through k and v;
    the attention output through ``o``). ``lora``: the module names LoRA targets; ``mask``: ``lora_linear_bytes``'."""
    I, h, q, kv = d.i, d.h, d.q, d.kv  # noqa: E741 - the intermediate size, as the docstrings name it

    def lin(fan_in: int, fan_out: int, name: str) -> int:
        return lora_linear_bytes(n, fan_in, fan_out, R, a, name in lora, mask)

    mlp = max(lin(h, I, "gate_proj"), R * n * I + lin(h, I, "up_proj"), 3 * R * n * I, R * n * I + lin(I, h, "down_proj"))
    attn = max(lin(h, q, "q_proj"), R * n * q + lin(h, kv, "k_proj"), R * n * (q + kv) + lin(h, kv, "v_proj"),
               R * n * q + lin(q, h, "o_proj"))
    return max(mlp, attn)


def stream_bytes(d: Dims, R: int, n: int) -> int:
    """What a layer's forward sees alive around it, over ``n`` tokens: the embeddings' output (the model's forward
    keeps ``inputs_embeds``), the layer's input, the attention's residual sum and its norm (``4 R h n``), and the
    rotary ``cos`` / ``sin`` (``2 R head_dim n``)."""
    return 4 * R * d.h * n + 2 * R * d.hd * n * d.rope_sets


def sampling_bytes(d: Dims, R: int, sequences: int) -> int:
    """Sampling the next token at the last decode step (``_sample``: ``next_token_logits =
    outputs.logits[:, -1, :].to(copy=True, dtype=float32)``, ``probs = softmax(...)``, TRL's default processors: none
    at temperature 1, top_p 1, top_k 0): the head's output for the last position (``R N V``), the new fp32 copy, the
    previous step's copy (``next_token_scores`` until rebound) and softmax (``probs``, until rebound): ``12 N V``; at the
    new softmax the previous copy is gone, as large."""
    return (R + 12) * sequences * d.V


def generation_terms(spec: ModelSpec, q: QuantSettings, adapter_dtype: str, lora: frozenset[str],
                     g: GenerationShape, dropout: float = 0.0, kernels: str = "cuda") -> dict[str, int]:
    """The generation phase's bytes beyond the weights, adapters and optimizer state, at its three moments:

    * ``prefill``: the last layer's forward over the ``N P`` prompt tokens, every layer's cache at ``P`` positions
      (``kv_cache_bytes``), the stream (``stream_bytes``), the layer's largest moment (``layer_forward_bytes``) and the
      4-D boolean mask of the left-padded prompts (``N P^2``);
    * ``decode``: the last decode forward, the previous step's fp32 logits and softmax alive (``8 N V``), at the
      largest of: a layer's cache tensor concatenated (``torch.cat``: the old ``P + C - 2`` positions and the new
      ``P + C - 1`` alive together, beside the token's q, k and v), a layer's moment over one token a row, the head's
      output at the forward's end (``R N V``);
    * ``sample``: the whole cache at ``P + C - 1`` positions and the sampling tensors (``sampling_bytes``).

    The decode moments add the token ids and attention mask ``generate`` grows by ``torch.cat`` (``4 x 8 N (P + C)``:
    the old and the new of each), the prefill the prompts' (``2 x 8 N P``). ``kv_cache`` is the cache after the last
    forward. ``dropout``: LoRA's, which runs in generation (``lora_linear_bytes``); ``kernels``: where (its mask's bytes
    differ)."""
    d = dims(spec)
    R, a = BYTES[q.unquantized_dtype], BYTES[adapter_dtype]
    mask = 0 if not dropout else (a if kernels == "cpu" else 1)
    N, P = g.sequences, g.prompt
    ids = 4 * 8 * N * (P + g.completion)
    kv = kv_cache_bytes(d, R, N, g.positions)
    prefill = (kv_cache_bytes(d, R, N, P) + stream_bytes(d, R, N * P) + layer_forward_bytes(d, N * P, R, a, lora, mask)
               + N * P * P)
    one_layer = d.kv * R * N * max(0, g.positions - 1)  # the old key (or value) tensor of one layer during its cat
    cat = one_layer + R * N * (d.q + 2 * d.kv)  # inside attention: this token's q, k and v beside the old tensor
    decode = kv + 8 * N * d.V + stream_bytes(d, R, N) + max(cat, layer_forward_bytes(d, N, R, a, lora, mask), R * N * d.V)
    sample = kv + sampling_bytes(d, R, N)
    prefill += 2 * 8 * N * P  # the prompts' ids and mask before any token is added
    out = {"prefill": prefill, "decode": ids + decode, "sample": ids + sample}
    return {"kv_cache": kv, "sampling": sampling_bytes(d, R, N), **out, "peak": max(out.values())}
