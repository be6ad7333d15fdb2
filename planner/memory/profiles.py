"""The step's memory model, chosen up front: one profile per trainer stack x backend x parallelism.

A plan's profile is picked by ``select_profile`` before anything is computed, from the plan's inputs
alone, and it alone computes the step's memory; no profile patches another's result (the sharded
profile *asks* the single-GPU profile beneath it for the single-GPU numbers it reports beside its
own). Each implements ``Profile``:

* ``memory(ctx, kernels)`` — the terms (``prediction.memory``'s keys), the moments of the step
  (``phases``), what each moment holds (``composition``), the peak moment and the overhead terms,
  for the GPU's kernels (``"cuda"``) or the same step run on the CPU (``"cpu"``);
* ``host(ctx, memory)`` — ``prediction.host``: host RAM the step keeps (offloaded checkpoints,
  paged optimizer states, offloaded shards);
* ``notes(ctx)`` — warnings the profile owes the user (e.g. off Unsloth's fast path);
* ``section(ctx, memory)`` — the plan document's ``distributed`` section, or None.

The profiles today:

* ``PeftProfile`` — HF Trainer + PEFT, autocast, full logits, non-reentrant or reentrant checkpointing
  (``planner.memory.phases``);
* ``UnslothProfile`` — Unsloth's fast LoRA path, offloaded checkpointing, fused cross-entropy
  (``planner.memory.unsloth``);
* ``ShardedProfile`` — one rank of DDP / FSDP2 / ZeRO-2/3 over the single-GPU profile of its
  backend (``planner.memory.per_rank``).

A new stack (another checkpointing, loss kernel, objective, method) is a new profile and one line
in ``select_profile``. ``StepContext`` holds what every profile reads, computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from qplan.planner.memory.host import host_prediction
from qplan.planner.memory.phases import MemoryModel, training_memory
from qplan.planner.memory.terms import Dims, TrainingSettings, dims, overhead_bytes
from qplan.planner.model.lora import LoraSettings, ModuleCount
from qplan.planner.model.spec import Gpu, ModelSpec
from qplan.planner.model.weights import QuantSettings, weights_breakdown, weights_bytes, weights_footprint_bytes
from qplan.planner.vocab import MEMORY_KEYS, PREFERENCE_OBJECTIVES


@dataclass(frozen=True)
class StepContext:
    """What a profile reads: the resolved settings, the model's dimensions and LoRA counts, computed once."""

    spec: ModelSpec
    dims: Dims
    lora: LoraSettings
    quant: QuantSettings
    training: TrainingSettings
    counts: tuple[ModuleCount, ...]
    #: bytes of the base weights on one GPU (``weights_bytes``)
    weights: int
    gpu: Gpu | None
    backend: str
    calibration: dict[str, Any] | None = None
    #: several GPUs (``planner.memory.sharding.DistSettings``); None: one GPU
    dist: Any = None

    @classmethod
    def build(cls, spec: ModelSpec, lora: LoraSettings, quant: QuantSettings, training: TrainingSettings,
              counts: list[ModuleCount], gpu: Gpu | None, backend: str, calibration: dict[str, Any] | None = None,
              dist: Any = None) -> StepContext:
        return cls(spec, dims(spec), lora, quant, training, tuple(counts), weights_bytes(spec, quant), gpu, backend,
                   calibration, dist)


class Profile(Protocol):
    """One trainer stack's memory model (see the module docstring)."""

    name: str

    def memory(self, ctx: StepContext, kernels: str = "cuda") -> dict[str, Any]: ...

    def host(self, ctx: StepContext, memory: dict[str, Any]) -> dict[str, int] | None: ...

    def notes(self, ctx: StepContext) -> list[str]: ...

    def section(self, ctx: StepContext, memory: dict[str, Any]) -> dict[str, Any] | None: ...


def _calibrated_overhead(mem: dict[str, Any], calibration: dict[str, Any] | None) -> dict[str, Any]:
    """A calibration file's measured CUDA context / allocator slack in place of the defaults."""
    if calibration and ("cuda_context_bytes" in calibration or "allocator_slack_fraction" in calibration):
        over = overhead_bytes(mem["tensor_peak"], calibration)
        return {**mem, **over, "overhead": sum(over.values()), "peak": mem["tensor_peak"] + sum(over.values())}
    return mem


def reference_weights(ctx: StepContext) -> int:
    """The reference model's weights: TRL 1.16's ``DPOTrainer``/``KTOTrainer`` without PEFT (full fine-tuning) load
    the policy's checkpoint a second time (``create_model_from_path`` with the policy's dtype and quantization:
    ``dpo_trainer.py``, ``kto_trainer.py`` ``__init__``), so as many bytes as the policy's weights; 0 otherwise (LoRA:
    the reference is the base with the adapters disabled; ``precompute_ref_log_probs``: the pass runs the policy before
    training, and no reference is loaded)."""
    full = any(c.kind == "full" for c in ctx.counts)
    t = ctx.training
    return ctx.weights if full and t.objective in PREFERENCE_OBJECTIVES and not t.precompute_ref_log_probs else 0


def _single_gpu_weights(ctx: StepContext, mem: dict[str, Any], reference: int = 0) -> dict[str, Any]:
    detail = weights_breakdown(ctx.spec, ctx.quant)
    return {**mem, "weights": ctx.weights + reference, "weights_footprint": weights_footprint_bytes(ctx.spec, ctx.quant),
            "weights_detail": {**detail, "reference": reference} if reference else detail}


class PeftProfile:
    """HF Trainer + PEFT on one GPU (``planner.memory.phases.MemoryModel``)."""

    name = "peft"
    #: the settings this stack trains with: checkpointing when it is on (``GRAD_CKPT``), and whether a
    #: k-bit model's unquantized parameters are upcast to fp32 (``prepare_model_for_kbit_training``)
    checkpointing = "hf"
    kbit_upcast = True

    def loss(self, ctx: StepContext) -> str:
        """The loss the step computes (``planner.memory.loss.LOSS_KINDS``): the plan's."""
        return ctx.training.loss

    def memory_model(self, ctx: StepContext, kernels: str = "cuda") -> MemoryModel:
        """The step's terms as linear forms in batch x sequence (what ``qplan fit`` searches with)."""
        t = ctx.training
        return MemoryModel.build(ctx.spec, list(ctx.counts), ctx.lora.r, ctx.lora.dropout, ctx.quant, t.grad_ckpt,
                                 t.optimizer, t.attn_impl, ctx.weights, self.loss(ctx), kernels, t.padded,
                                 ctx.lora.use_dora, t.liger_kernels, t.objective)

    def memory(self, ctx: StepContext, kernels: str = "cuda") -> dict[str, Any]:
        ref = reference_weights(ctx)
        mem = training_memory(ctx.spec, list(ctx.counts), ctx.lora.r, ctx.lora.dropout, ctx.quant, ctx.training,
                              ctx.weights + ref, loss=self.loss(ctx), kernels=kernels, dora=ctx.lora.use_dora)
        if kernels == "cuda":
            mem = _calibrated_overhead(mem, ctx.calibration)
        return _single_gpu_weights(ctx, mem, ref)

    def host(self, ctx: StepContext, memory: dict[str, Any]) -> dict[str, int] | None:
        t = ctx.training
        return host_prediction(ctx.dims, ctx.quant, *t.shape, t.grad_ckpt, memory["optimizer_paged"],
                               offloaded=memory.get("host_offload"))

    def notes(self, ctx: StepContext) -> list[str]:
        return []

    def section(self, ctx: StepContext, memory: dict[str, Any]) -> dict[str, Any] | None:
        return None


class UnslothProfile(PeftProfile):
    """Unsloth on one GPU (``planner.memory.unsloth``): its fast LoRA path, offloaded checkpointing,
    fused cross-entropy, RoPE cache and dequantization scratch. Unsloth sizes its loss chunks from the
    GPU's memory: the plan's GPU, else an 80 GiB one with 60 GiB free. On the CPU (``qplan run
    --device cpu``) the step is PEFT's with the chunked loss."""

    name = "unsloth"
    checkpointing = "unsloth"
    #: Unsloth's prepare_model_for_training (unsloth_zoo 2026.10.9 training_utils.py) casts only the LoRA
    #: weights to fp32: embeddings, head, norms and biases keep the load dtype (no kbit upcast)
    kbit_upcast = False

    def loss(self, ctx: StepContext) -> str:
        """Unsloth's own chunked cross-entropy (no fp32 copies of the logits)."""
        return "unsloth"

    def memory(self, ctx: StepContext, kernels: str = "cuda") -> dict[str, Any]:
        if kernels == "cpu":
            return super().memory(ctx, kernels)
        from qplan.planner.memory.unsloth import DEFAULT_FREE_BYTES, DEFAULT_TOTAL_BYTES, fast_path, unsloth_memory

        lora, t = ctx.lora, ctx.training
        if ctx.gpu is not None:
            total = ctx.gpu.total_bytes
            free = max(total - ctx.weights, 0)
        else:
            total, free = DEFAULT_TOTAL_BYTES, DEFAULT_FREE_BYTES
        fast = fast_path(ctx.spec, list(ctx.counts), lora.dropout, lora.bias, lora.use_dora)
        mem = unsloth_memory(ctx.spec, list(ctx.counts), ctx.quant, t.grad_ckpt, *t.shape, ctx.weights,
                             t.optimizer, t.grad_accum, fast, total, free)
        return _single_gpu_weights(ctx, _calibrated_overhead(mem, ctx.calibration))

    def notes(self, ctx: StepContext) -> list[str]:
        """Off the fast path; an optimizer other than Unsloth's default."""
        from qplan.planner.memory.unsloth import fast_path_warning, optimizer_note

        lora = ctx.lora
        notes = [fast_path_warning(ctx.spec, list(ctx.counts), lora.dropout, lora.bias, lora.use_dora),
                 optimizer_note(ctx.training.optimizer)]
        return [n for n in notes if n]


class ShardedProfile:
    """One rank of a multi-GPU plan (``planner.memory.per_rank.rank_memory``) over ``single``, the
    single-GPU profile of the plan's backend, whose numbers the ``distributed`` section reports."""

    name = "sharded"

    def __init__(self, single: PeftProfile) -> None:
        self.single = single

    def memory(self, ctx: StepContext, kernels: str = "cuda") -> dict[str, Any]:
        """The rank's memory; on the GPU also ``single``, the single-GPU profile's memory of the same step
        (computed once here, read by ``host`` and ``section``)."""
        from qplan.planner.memory.per_rank import rank_memory

        mem = rank_memory(ctx.spec, list(ctx.counts), ctx.lora.r, ctx.lora.dropout, ctx.quant, ctx.training, ctx.dist,
                          self.single.loss(ctx), kernels, ctx.calibration if kernels == "cuda" else None,
                          ctx.lora.use_dora)
        return {**mem, "single": self.single.memory(ctx)} if kernels == "cuda" else mem

    def host(self, ctx: StepContext, memory: dict[str, Any]) -> dict[str, int] | None:
        """Host RAM per node: each of its ranks' own host terms (the single-GPU ones but for the sharded
        paged optimizer state), and the states FSDP/ZeRO offload to it."""
        single = self.single.host(ctx, memory["single"])
        if single is None:
            return None
        g = ctx.dist.gpus
        h = {k: int(v) * g for k, v in single.items() if k != "peak"}
        h["paged_optimizer"] = int(memory["optimizer_paged"]) * g
        h["offloaded_states"] = int(memory["host_offload"]) * g
        return {**h, "peak": sum(h.values())}

    def notes(self, ctx: StepContext) -> list[str]:
        return self.single.notes(ctx)

    def section(self, ctx: StepContext, memory: dict[str, Any]) -> dict[str, Any] | None:
        from qplan.planner.memory.per_rank import distributed_section

        single = memory["single"]
        return distributed_section(ctx.spec, ctx.quant, ctx.dist, memory, {k: single[k] for k in
                                                                            ("weights", "tensor_peak", "peak")})


PROFILES = {"peft": PeftProfile, "unsloth": UnslothProfile}


def select_profile(backend: str, dist: Any = None) -> Profile:
    """The profile of a plan, from its backend and parallelism (chosen before anything is computed)."""
    single = PROFILES[backend]()
    return single if dist is None else ShardedProfile(single)


def memory_document(mem: dict[str, Any]) -> dict[str, int]:
    """``prediction.memory``: the profile's terms in plan.json's order, as integers."""
    return {k: int(mem[k]) for k in MEMORY_KEYS}
