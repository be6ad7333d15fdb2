"""Training-memory terms: one pure function per term, integer bytes, formula and source in each.

Notation: ``T = batch_size * seq_len`` tokens per micro-batch, ``h`` hidden size, ``i`` MLP
intermediate size, ``V`` vocabulary, ``L`` decoder layers, ``c`` bytes of the compute dtype.

The peak of a training step is the largest of three moments (torch ``MemTracker`` phases):

* **forward/loss end** — weights + adapters + optimizer states (from step 2 on) + every saved
  activation + the logits and the loss's fp32 copies;
* **backward** — the same, minus the activations already consumed, plus the gradients so far and
  the gradient of the logits;
* **optimizer step** — weights + adapters + gradients + optimizer states + the step's temporaries.

Everything here is checked against an independent oracle: the live-tensor trace of one real
training step (``planner.trace``, on the meta device for full-size models and on the CPU against
real tensors), see tests/planner/test_memory.py and reports/accuracy/.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import QPlanError
from .lora import ModuleCount
from .weights import BYTES, QuantSettings

OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "adafactor")
ATTN_IMPLS = ("sdpa", "flash_attention_2", "eager")
GRAD_CKPT = ("off", "hf", "unsloth")

#: bitsandbytes 8-bit optimizers keep tensors with fewer elements in 32-bit state
#: (``Optimizer2State(min_8bit_size=4096)``, bitsandbytes/optim/optimizer.py).
BNB_MIN_8BIT_SIZE = 4096
#: block size of the blockwise 8-bit optimizer state (``init_state``: ``blocksize = 256``).
BNB_OPTIM_BLOCKSIZE = 256
#: paged optimizers page only tensors with at least this many elements (``init_state``:
#: ``if not self.is_paged or p.numel() < 1e5``); smaller ones are ordinary device tensors.
BNB_PAGED_MIN_NUMEL = 100_000

#: CUDA context + cuBLAS/cuDNN handles and workspaces, outside PyTorch's allocator counters.
#: Uncalibrated: a typical figure for a CUDA 12 context with cuBLAS loaded. Issue 5 fits it
#: from GPU runs (reports/gpu/); until then it is a named assumption, printed with the plan.
CUDA_CONTEXT_BYTES = 512 * 2**20
#: Caching-allocator slack (``max_memory_reserved - max_memory_allocated``) as a fraction of
#: the tensor peak: block rounding (512 B, 2 MiB segments) and fragmentation. Uncalibrated
#: assumption, to be fitted on the GPU runs of issue 5.
ALLOCATOR_SLACK_FRACTION = 0.05


@dataclass(frozen=True)
class TrainingSettings:
    batch_size: int = 1
    seq_len: int = 512
    grad_accum: int = 1
    grad_ckpt: str = "hf"
    optimizer: str = "adamw_torch"
    attn_impl: str = "sdpa"

    def validate(self, spec: dict[str, Any]) -> None:
        if self.batch_size <= 0:
            raise QPlanError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.seq_len <= 0:
            raise QPlanError(f"--seq-len must be >= 1, got {self.seq_len}")
        if self.grad_accum <= 0:
            raise QPlanError(f"--grad-accum must be >= 1, got {self.grad_accum}")
        if self.optimizer not in OPTIMIZERS:
            raise QPlanError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.attn_impl not in ATTN_IMPLS:
            raise QPlanError(f"unknown attention implementation {self.attn_impl!r}: choose one of {', '.join(ATTN_IMPLS)}")
        if self.grad_ckpt not in GRAD_CKPT:
            raise QPlanError(f"unknown gradient checkpointing mode {self.grad_ckpt!r}: choose one of {', '.join(GRAD_CKPT)}")
        ctx = max_context(spec)
        if ctx and self.seq_len > ctx:
            raise QPlanError(
                f"--seq-len {self.seq_len} exceeds {spec['name']}'s context of {ctx} tokens "
                f"(max_position_embeddings)"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def max_context(spec: dict[str, Any]) -> int | None:
    c = spec["config"]
    v = c.get("max_position_embeddings") or c.get("n_positions")
    return int(v) if v else None


# ------------------------------------------------------------------------------ model dims


@dataclass(frozen=True)
class Dims:
    h: int
    L: int
    V: int
    nh: int
    nkv: int
    hd: int
    i: int
    gated: bool
    tied: bool

    @property
    def q(self) -> int:
        return self.nh * self.hd

    @property
    def kv(self) -> int:
        return self.nkv * self.hd


def dims(spec: dict[str, Any]) -> Dims:
    """Model dimensions from the config (names differ by family: GPT-2 uses n_embd/n_layer)."""
    c = spec["config"]
    inv = spec["inventory"]
    h = int(c.get("hidden_size") or c.get("n_embd"))
    L = int(c.get("num_hidden_layers") or c.get("n_layer"))
    V = int(c.get("vocab_size"))
    nh = int(c.get("num_attention_heads") or c.get("n_head"))
    nkv = int(c.get("num_key_value_heads") or nh)
    hd = int(c.get("head_dim") or h // nh)
    i = int(c.get("intermediate_size") or c.get("n_inner") or 4 * h)
    leaves = {g["pattern"].rsplit(".", 1)[-1] for g in inv["linear"]}
    gated = bool({"gate_proj", "gate_up_proj", "w1", "w3"} & leaves) or any(
        p["param"] == "gate_up_proj" for p in inv["params"]
    )
    return Dims(h, L, V, nh, nkv, hd, i, gated, bool(inv["tied"]))


# ---------------------------------------------------------------------- trainable tensors


def trainable_tensors(counts: list[ModuleCount]) -> list[tuple[int, str]]:
    """(numel, dtype) of every trainable tensor, one entry per tensor instance."""
    out = []
    for c in counts:
        for _, shape in c.save_keys:
            out.extend([(math.prod(shape), c.dtype)] * c.instances)
    return out


def adapter_bytes(counts: list[ModuleCount]) -> int:
    """Trainable parameters on the device: ``sum(numel * bytes(dtype))``.

    PEFT creates LoRA weights in float32 (``autocast_adapter_dtype=True`` upcasts fp16/bf16
    adapters, peft/tuners/tuners_utils.py ``_cast_adapter_dtype``); ``modules_to_save`` copies
    and trainable biases keep their module's dtype.
    """
    return sum(n * BYTES[dt] for n, dt in trainable_tensors(counts))


def gradient_bytes(counts: list[ModuleCount]) -> int:
    """``.grad`` of every trainable parameter, same dtype as the parameter; frozen weights have none."""
    return adapter_bytes(counts)


def optimizer_state_bytes(counts: list[ModuleCount], optimizer: str) -> dict[str, int]:
    """Optimizer state, split into ordinary device memory and paged (CUDA unified) memory.

    * ``adamw_torch``: ``exp_avg`` and ``exp_avg_sq`` like the parameter (torch/optim/adamw.py);
      ``step`` is a CPU scalar unless capturable/fused.
    * ``adamw_8bit``/``paged_adamw_8bit`` (bitsandbytes ``Optimizer2State.init_state``): tensors
      with < 4096 elements keep two fp32 states; larger ones two uint8 states plus two fp32
      ``absmax`` per 256-element block. Paged variants put tensors with >= 1e5 elements in
      paged memory.
    * ``paged_adamw_32bit``: two fp32 states, paged from 1e5 elements.
    * ``sgd``: Trainer's SGD has no momentum, so no state.
    * ``adafactor`` (transformers.optimization.Adafactor, ``beta1=None``): factored second
      moment for >= 2-D tensors: one fp32 row vector and one column vector; 1-D: full fp32.
    """
    dev = paged = 0
    for c in counts:
        for _, shape in c.save_keys:
            n = math.prod(shape)
            k = c.instances
            if optimizer == "adamw_torch":
                dev += k * 2 * n * BYTES[c.dtype]
            elif optimizer in ("adamw_8bit", "paged_adamw_8bit"):
                if n < BNB_MIN_8BIT_SIZE:
                    b = 2 * n * 4
                else:
                    b = 2 * n + 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCKSIZE)
                if optimizer.startswith("paged") and n >= BNB_PAGED_MIN_NUMEL:
                    # state1/state2 are paged; absmax stays an ordinary tensor
                    paged += k * 2 * n
                    dev += k * (b - 2 * n)
                else:
                    dev += k * b
            elif optimizer == "paged_adamw_32bit":
                if n >= BNB_PAGED_MIN_NUMEL:
                    paged += k * 2 * n * 4
                else:
                    dev += k * 2 * n * 4
            elif optimizer == "sgd":
                pass
            elif optimizer == "adafactor":
                if len(shape) >= 2:
                    dev += k * 4 * (shape[0] + math.prod(shape[1:]))
                else:
                    dev += k * 4 * n
            else:  # pragma: no cover - validated earlier
                raise QPlanError(f"unknown optimizer {optimizer!r}")
    return {"device": dev, "paged": paged}


def optimizer_step_temp_bytes(counts: list[ModuleCount], optimizer: str) -> int:
    """Transient tensors of one optimizer step.

    ``adamw_torch`` (foreach, torch/optim/adam.py ``_multi_tensor_adam``): ``exp_avg_sq_sqrt =
    torch._foreach_sqrt(exp_avg_sqs)`` — one parameter-sized tensor per trainable tensor, all alive
    at once. bitsandbytes 8-bit/32-bit steps update in place (fused kernels). Adafactor:
    ``update = grad**2 + eps`` and the approximated ``update`` — two fp32 copies of the largest
    tensor at a time (it loops over parameters). SGD: none.
    """
    tensors = trainable_tensors(counts)
    if optimizer == "adamw_torch":
        return sum(n * BYTES[dt] for n, dt in tensors)
    if optimizer == "adafactor":
        return 2 * 4 * max((n for n, _ in tensors), default=0)
    return 0


# ------------------------------------------------------------------------- activations


def _targeted(counts: list[ModuleCount]) -> dict[str, tuple[int, int]]:
    """leaf name -> (in_features, instances per layer) of LoRA-targeted linear modules."""
    out = {}
    for c in counts:
        if c.kind != "lora" or "→" not in c.shape:
            continue
        i_ = int(c.shape.split("→")[0])
        out[c.module] = (i_, c.instances)
    return out


def lora_branch_activation_bytes(counts: list[ModuleCount], T: int, c: int, r: int, dropout: float, L: int) -> int:
    """Per decoder layer: what each LoRA branch saves for backward.

    PEFT 0.21 ``lora.Linear.forward``: ``x = self._cast_input_dtype(x, lora_A.weight.dtype)``
    (a float32 copy of the input, per targeted module — q, k and v each make their own), then
    ``lora_B(lora_A(dropout(x))) * scaling`` under autocast. Saved per branch: the dropout mask
    (1 byte per input element, if ``dropout > 0``), the autocast copy of the (dropped-out) input
    in the compute dtype (``c * in * T``) for ``lora_A``'s weight gradient, and ``lora_A``'s
    output ``c * r * T`` for ``lora_B``'s.
    """
    total = 0
    for c_ in counts:
        if c_.kind != "lora" or "→" not in c_.shape or L == 0:
            continue
        in_f = int(c_.shape.split("→")[0])
        per_layer = c_.instances / L
        b = c * in_f * T + c * r * T
        if dropout > 0:
            b += in_f * T
        total += int(per_layer * b)
    return total


def norm_activation_bytes(d: Dims, T: int) -> int:
    """Two RMSNorms per layer (Llama-style ``hidden_states.to(float32)``): each saves the fp32
    input (``4 h T``) and the fp32 ``rsqrt`` per token (``4 T``)."""
    return 2 * (4 * d.h * T + 4 * T)


def attention_activation_bytes(d: Dims, b: int, s: int, c: int, attn_impl: str) -> int:
    """Attention core per layer: rotated q, k, v and the output (``c T (q + 2 kv + q)``) plus the
    fp32 log-sum-exp per head and token kept by flash/memory-efficient SDPA (``4 nh T``);
    ``eager`` also keeps the softmax probabilities ``c b nh s^2`` (and their fp32 source)."""
    T = b * s
    base = c * T * (2 * d.q + 2 * d.kv) + 4 * d.nh * T
    if attn_impl == "eager":
        base += (c + 4) * b * d.nh * s * s
    return base


def mlp_activation_bytes(d: Dims, T: int, c: int) -> int:
    """MLP per layer. Gated (SwiGLU/GeGLU): gate and up outputs and ``act(gate)``, ``3 c i T``.
    Plain (GPT-2): the fc output and the activation output, ``2 c i T``."""
    return (3 if d.gated else 2) * c * d.i * T


def layer_activation_bytes(spec: dict[str, Any], counts: list[ModuleCount], lora_r: int, dropout: float,
                           t: TrainingSettings, c: int) -> int:
    """Everything one decoder layer keeps for backward, without checkpointing."""
    d = dims(spec)
    T = t.batch_size * t.seq_len
    return (
        norm_activation_bytes(d, T)
        + attention_activation_bytes(d, t.batch_size, t.seq_len, c, t.attn_impl)
        + mlp_activation_bytes(d, T, c)
        + c * d.h * T  # the layer input (residual stream), alive across the layer
        + lora_branch_activation_bytes(counts, T, c, lora_r, dropout, d.L)
    )


def activation_bytes(spec: dict[str, Any], counts: list[ModuleCount], lora_r: int, dropout: float,
                     t: TrainingSettings, c: int) -> int:
    """Activations alive at the end of the forward pass.

    * no checkpointing: ``L * layer``;
    * HF checkpointing (``torch.utils.checkpoint``): each layer keeps only its input
      ``c h T``; during backward one layer is recomputed, adding one ``layer`` on top;
    * Unsloth (``use_gradient_checkpointing="unsloth"``): the layer inputs are offloaded to
      CPU RAM, so only the recomputed layer is on the device.
    """
    d = dims(spec)
    T = t.batch_size * t.seq_len
    layer = layer_activation_bytes(spec, counts, lora_r, dropout, t, c)
    if t.grad_ckpt == "off":
        return d.L * layer
    if t.grad_ckpt == "hf":
        return d.L * c * d.h * T + layer
    return c * d.h * T + layer


def logits_bytes(spec: dict[str, Any], t: TrainingSettings, c: int, chunked: bool = False) -> int:
    """Logits and loss at their peak.

    transformers ``ForCausalLMLoss`` (loss/loss_utils.py): the head writes ``c T V`` logits,
    ``logits.float()`` makes an fp32 copy ``4 T V`` and ``cross_entropy``'s ``log_softmax`` keeps
    its fp32 output ``4 T V`` for backward: ``(c + 8) T V`` at the end of the loss. Unsloth's
    chunked cross-entropy never materialises the fp32 copies: ``c T V``.
    """
    d = dims(spec)
    T = t.batch_size * t.seq_len
    if chunked:
        return c * T * d.V
    return (c + 8) * T * d.V


def dequant_temp_bytes(spec: dict[str, Any], q: QuantSettings, c: int) -> int:
    """bitsandbytes dequantizes a k-bit weight to the compute dtype for each matmul
    (``MatMul4Bit``: ``F.dequantize_4bit(B, quant_state).to(A.dtype)``): a temporary as large as
    the largest quantized layer, ``c * in * out``."""
    if not q.kbit:
        return 0
    sizes = [g["in_features"] * g["out_features"] for g in spec["inventory"]["linear"]
             if g["bnb_quantized"] and not g.get("weight_tied")]
    return c * max(sizes, default=0)


def overhead_bytes(tensor_peak: int) -> dict[str, int]:
    """What the GPU holds beyond live tensors: the CUDA context (``CUDA_CONTEXT_BYTES``) and the
    caching allocator's slack (``ALLOCATOR_SLACK_FRACTION * tensor_peak``)."""
    return {
        "cuda_context": CUDA_CONTEXT_BYTES,
        "allocator_slack": int(ALLOCATOR_SLACK_FRACTION * tensor_peak),
    }


def training_memory(spec: dict[str, Any], counts: list[ModuleCount], lora_r: int, dropout: float,
                    q: QuantSettings, t: TrainingSettings, weights: int, chunked_ce: bool = False) -> dict[str, int]:
    """All terms and the peak (max over the forward, backward and optimizer moments)."""
    c = BYTES[q.compute_dtype]
    adapters = adapter_bytes(counts)
    grads = gradient_bytes(counts)
    opt = optimizer_state_bytes(counts, t.optimizer)
    optimizer = opt["device"] + opt["paged"]
    acts = activation_bytes(spec, counts, lora_r, dropout, t, c)
    logits = logits_bytes(spec, t, c, chunked=chunked_ce)
    temps_dq = dequant_temp_bytes(spec, q, c)
    temps_opt = optimizer_step_temp_bytes(counts, t.optimizer)
    static = weights + adapters + optimizer
    # gradients stay alive between micro-batches when accumulating
    grads_in_fwd = grads if t.grad_accum > 1 else 0
    forward = static + grads_in_fwd + acts + logits + temps_dq
    backward = static + grads + acts + logits + temps_dq
    step = static + grads + temps_opt
    tensor_peak = max(forward, backward, step)
    over = overhead_bytes(tensor_peak)
    return {
        "adapters": adapters,
        "gradients": grads,
        "optimizer": optimizer,
        "optimizer_paged": opt["paged"],
        "activations": acts,
        "logits": logits,
        "temporaries": max(temps_dq, temps_opt),
        "overhead": sum(over.values()),
        "cuda_context": over["cuda_context"],
        "allocator_slack": over["allocator_slack"],
        "tensor_peak": tensor_peak,
        "peak": tensor_peak + sum(over.values()),
        "peak_phase": {forward: "forward", backward: "backward", step: "optimizer"}[tensor_peak],
    }
