"""From options to the plan: ``plan_inputs`` resolves ``PlanOptions`` into settings (the model spec,
the GPU, LoRA / quantization / training settings, several GPUs), and ``build_plan`` computes the
``PlanDoc`` (plan.json) with the profile chosen for the plan (``planner.memory.profiles``). Compute
only; rendering is in render.py.

Same inputs give a byte-identical document: no timestamps, no host names, fixed key order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec

from qplan.planner import __version__
from qplan.planner.data import check_data_options, data_profile
from qplan.planner.document import (
    PLAN_SCHEMA_VERSION,
    Compute,
    Cost,
    DataSection,
    DistributedSection,
    Flops,
    GpuSection,
    Launches,
    LoraSection,
    Memory,
    ModelSection,
    Moved,
    Params,
    PlanDoc,
    Prediction,
    QuantSection,
    Time,
    TrainingSection,
    section,
)
from qplan.planner.errors import QPlanError
from qplan.planner.memory.loss import LIGER_MODEL_TYPES
from qplan.planner.memory.moe import moe_dims
from qplan.planner.memory.profiles import PROFILES, StepContext, memory_document, select_profile
from qplan.planner.memory.sharding import DistSettings, sharded_counts
from qplan.planner.memory.terms import (
    TrainingSettings,
    accuracy_warning,
    dims,
    max_context,
    resolve_attn,
    text_only_warning,
)
from qplan.planner.method_sections import METHOD_SECTIONS
from qplan.planner.methods import PeftSettings, check_full_options, check_method, method_warnings, peft_method
from qplan.planner.model.catalog import load_gpu, load_spec, spec_origin, user_spec_dir
from qplan.planner.model.full import check_full, count_full
from qplan.planner.model.lora import (
    LoraSettings,
    adapter_file_bytes,
    added_params,
    count_lora,
    default_dropout,
    moved_targets_warning,
    resolve_targets,
    trainable_params,
)
from qplan.planner.model.seq_cls import SCORE, reward_spec
from qplan.planner.model.spec import Gpu, ModelSpec
from qplan.planner.model.weights import QuantSettings, base_params, checkpoint_quant, unquantized_experts_warning
from qplan.planner.objectives import (
    check_data_format,
    check_grpo,
    check_objective_flags,
    check_preference,
    check_reward,
    generation_section,
    generation_work,
    kbit_adapters,
    kbit_note,
    objective_note,
)
from qplan.planner.options import DEFAULT_QUANT, FULL_QUANT, PlanOptions, as_dict, check_options
from qplan.planner.validate import read_calibration
from qplan.planner.vocab import (
    ADAPTER_DTYPE_NAMES,
    BACKENDS,
    BYTES,
    DTYPE_ALIASES,
    LIGER_KERNELS,
    MIXED_PRECISION,
    PREFERENCE_OBJECTIVES,
    optimizer,
)

#: --seq-len when neither it nor --data is given
DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class PlanInputs:
    spec: ModelSpec
    lora: LoraSettings
    quant: QuantSettings
    training: TrainingSettings
    gpu: Gpu | None
    backend: str = "peft"
    #: time and cost: tokens the run trains on, price per GPU-hour, a fitted efficiency
    tokens: int | None = None
    price_per_hour: float | None = None
    calibration: dict[str, Any] | None = None
    #: several GPUs (``planner.memory.sharding.DistSettings``); None: one GPU
    dist: Any = None
    #: ``--data``: ``prediction.data`` (``planner.data.data_profile``); None: a shape given by --seq-len
    data: dict[str, Any] | None = None
    #: ``--full``: full fine-tuning, every parameter trains (``planner.model.full``); ``lora`` is then unused
    full: bool = False
    #: ``--peft-type`` other than lora: the method's settings (``planner.methods``); ``lora`` is then unused
    peft: PeftSettings | None = None


def check_gpu_dtype(quant: QuantSettings, gpu: Gpu | None, auto_fix: bool,
                    full: bool = False) -> tuple[QuantSettings, list[str]]:
    """bf16 needs compute capability >= 8.0. Switch to fp16 with a warning, or fail with the fix. Full fine-tuning
    (``full``) switches bf16 weights to fp32 under fp16 autocast: the Trainer's fp16 ``GradScaler`` refuses fp16
    weights (``check_full``)."""
    warnings: list[str] = []
    uses_bf16 = quant.compute_dtype == "bfloat16" or quant.quant == "bf16"
    if gpu is not None and uses_bf16 and not gpu.bf16:
        if not auto_fix:
            raise QPlanError(
                f"{gpu.name} has no native bfloat16 (compute capability {gpu.compute_capability}): "
                f"use --compute-dtype fp16" + (" --quant fp16" if quant.quant == "bf16" else "")
            )
        new_quant = ("fp32" if full else "fp16") if quant.quant == "bf16" else quant.quant
        changed = new_quant != quant.quant
        quant = QuantSettings(new_quant, quant.double_quant, "float16", quant.upcast_kbit, quant.skip_modules)
        warnings.append(f"{gpu.name} has no native bfloat16: switched compute dtype to float16"
                        + (f" and weights to {new_quant}" if changed else ""))
    return quant, warnings


def plan_inputs(options: PlanOptions | dict[str, Any] | None = None, /, *, spec: ModelSpec | None = None,
                device: Gpu | None = None, **fields: Any) -> tuple[PlanInputs, list[str]]:
    """The validated inputs of a plan (and the warnings resolving them produced).

    ``options`` is checked against ``PlanOptions`` (types, bounds, choices) before any work; a
    violation is one line naming the CLI flag. ``spec`` / ``device``: an already loaded model spec or
    GPU, used instead of looking up ``options.model`` / ``options.gpu``."""
    if options is None:  # keywords may name an already loaded spec or GPU: model=spec, gpu=Gpu
        if isinstance(fields.get("model"), ModelSpec):
            spec, fields = fields["model"], {**fields, "model": fields["model"].name}
        if isinstance(fields.get("gpu"), Gpu):
            device, fields = fields["gpu"], {**fields, "gpu": fields["gpu"].name}
    o = check_options(fields if options is None else options)
    check_objective_flags(o)
    r, alpha, dropout, bias = o.r, o.alpha, o.dropout, o.bias
    targets = o.targets if o.targets is not None else "all-linear"
    peft = peft_method(o)
    quant, double_quant, compute_dtype, upcast = o.quant, o.double_quant, o.compute_dtype, o.upcast
    tokens, dataset_tokens, epochs, calibration = o.tokens, o.dataset_tokens, o.epochs, o.calibration
    backend, gpus, nodes, strategy, cpu_offload = o.backend, o.gpus, o.nodes, o.strategy, o.cpu_offload
    network_gbps = o.network_gbps
    modules_to_save, target_parameters, model, gpu = o.modules_to_save, o.target_parameters, o.model, o.gpu
    if o.full:
        check_full_options(o)
        quant = quant or FULL_QUANT
    if peft is not None or o.objective == "reward":  # the other PEFT methods, and a reward model, on 16/32-bit bases
        quant = quant or FULL_QUANT
    quant = quant or DEFAULT_QUANT
    if check_data_options(as_dict(o), o.seq_len) and (tokens is not None or dataset_tokens is not None):
        raise QPlanError("--data counts the tokens: leave out --tokens and --dataset-tokens (--epochs sets passes)")
    if tokens is not None and (dataset_tokens is not None or epochs is not None):
        raise QPlanError("give either --tokens or --dataset-tokens with --epochs, not both")
    if o.data is None and (dataset_tokens is None) != (epochs is None):
        raise QPlanError("--dataset-tokens and --epochs go together (tokens trained = dataset tokens x epochs)")
    if dataset_tokens is not None and epochs is not None:
        tokens = max(1, math.ceil(dataset_tokens * epochs))
    calib = read_calibration(calibration) if calibration else None
    if spec is None and model is None:
        raise QPlanError("--model is required (a bundled name, a config.json, a Hub id), or --from-config FILE")
    if spec is None and not model.strip():
        raise QPlanError("--model is empty: give a bundled name (see `qplan models`), a config.json or a model folder")
    if device is None and gpu is not None and not gpu.strip():
        raise QPlanError("--gpu is empty: give a GPU name (see `qplan gpus`) or leave the option out")
    spec = spec if spec is not None else load_spec(model)
    if o.objective == "reward":  # AutoModelForSequenceClassification: a score head in place of the LM head
        check_reward(o)
        spec, modules_to_save, dropout = reward_spec(spec), [*modules_to_save, SCORE], 0.0  # PEFT's SEQ_CLS copy
    gpu_ = device if device is not None else (None if gpu is None else load_gpu(gpu))
    if isinstance(modules_to_save, str):
        modules_to_save = modules_to_save.split(",")
    if isinstance(target_parameters, str):
        target_parameters = target_parameters.split(",")
    loss, grpo = o.loss, None
    if o.objective == "grpo":  # TRL's GRPOTrainer: generation, then the rows through its fused head
        grpo, grpo_len = check_grpo(o, spec, gpu_)
        loss = "trl"
    if o.objective in PREFERENCE_OBJECTIVES:
        loss = check_preference(o)
        dropout = 0.0  # DPOConfig/KTOConfig.disable_dropout (True): every dropout module's p set to 0
    if dropout is None:
        dropout = default_dropout(spec, targets, tuple(m.strip() for m in target_parameters if m.strip()))
    lora = LoraSettings(
        r=r, alpha=alpha if alpha is not None else 2.0 * r, dropout=dropout, targets=targets, bias=bias,
        use_dora=o.dora, use_rslora=o.rslora, modules_to_save=tuple(m.strip() for m in modules_to_save if m.strip()),
        target_parameters=tuple(m.strip() for m in target_parameters if m.strip()),
        adapter_dtype=ADAPTER_DTYPE_NAMES[o.adapter_dtype], fa=optimizer(o.optimizer).peft == "lorafa",
    )
    stack = PROFILES[backend]  # the trainer stack's own settings (the profile is chosen in build_plan)
    q = QuantSettings(quant, double_quant, DTYPE_ALIASES[compute_dtype], upcast and stack.kbit_upcast)
    q, ck_warnings = checkpoint_quant(spec, q)
    if o.objective in (*PREFERENCE_OBJECTIVES, "grpo") and q.kbit:
        lora, ck_warnings = (kbit_adapters(lora, o.objective),
                             ck_warnings + [kbit_note(o.objective)] * (lora.adapter_dtype == "float32"))
    if o.reentrant and not o.grad_ckpt:
        raise QPlanError("--reentrant is a kind of gradient checkpointing: leave out --no-grad-ckpt, or --reentrant")
    if o.reentrant and stack.checkpointing != "hf":
        raise QPlanError(f"--reentrant is for the peft backend: the {backend} backend checkpoints its own way "
                         f"({stack.checkpointing})")
    ckpt = ("reentrant" if o.reentrant else stack.checkpointing) if o.grad_ckpt else "off"
    data = None
    seq_len = o.seq_len if o.seq_len is not None else DEFAULT_SEQ_LEN
    if grpo is not None:  # a row is the longest prompt (left-padded to it) and the completion
        seq_len = grpo_len
    if o.data is not None:
        data = data_profile(o.data, tokenizer=o.tokenizer, model_source=dict(spec.source or {}), fmt=o.data_format,
                            max_length=o.max_seq_len, batching=o.batching, packing_strategy=o.packing_strategy,
                            batch_size=o.batch_size, grad_accum=o.grad_accum, pad_to_multiple_of=o.pad_to_multiple_of,
                            long_samples=o.long_samples)
        check_data_format(o.objective, data["format"])
        seq_len = data["worst_batch"]["seq_len"]
        data["largest_first"] = o.largest_first
        ctx = max_context(spec)
        if ctx and seq_len > ctx:
            longest = data["longest_sample"]
            raise QPlanError(f"--data: the worst batch is {seq_len:,} tokens long (the longest sample, row "
                             f"{longest['row']}, has {longest['tokens']:,}), over {spec.name}'s context of {ctx:,}: cap "
                             f"the samples with --max-seq-len {ctx} (TRL's max_length, axolotl's sequence_len)")
        data["epochs"] = epochs if epochs is not None else 1.0
        if gpu_ is not None:  # the time of a step depends on the device
            rows = 2 if o.objective in ("dpo", "reward") else 1  # a pair's chosen and rejected rows, both padded
            tokens = max(1, math.ceil(rows * data["padded_tokens_per_epoch"] * data["epochs"]))
    attn = resolve_attn(spec, o.attn_impl)
    flat = data["worst_batch"].get("flat_tokens", 0) if data is not None else 0
    # a 4-D attention mask: padded rows, or padding-free packs under SDPA/eager (transformers tells the documents apart
    # from the position ids with a block-causal mask; flash attention runs them varlen, without one)
    mask = data is not None and (bool(data["worst_batch"].get("padded")) or (bool(flat) and attn != "flash_attention_2"))
    # DPO: a pair's chosen and rejected sequences differ in length, so its rows are padded and the attention_mask the
    # collator passes has zeros (flash attention runs the rows unpadded, varlen)
    # (KTO's unpaired rows differ in length too, and a reward model's pairs: padded)
    mask = mask or (o.objective != "sft" and attn != "flash_attention_2")
    training = TrainingSettings(o.batch_size, seq_len, o.grad_accum, ckpt, o.optimizer, attn, bool(mask), flat, loss,
                                liger_kernels(o.liger_kernels, spec, backend, strategy),
                                getattr(peft, "num_virtual_tokens", 0), o.objective, grpo, o.precompute_ref_log_probs,
                                o.precompute_ref_batch_size or 0)
    loss_notes = check_fused_loss(loss, spec, q, gpu_, backend, strategy) if loss != "full" else []
    q, warnings = check_gpu_dtype(q, gpu_, auto_fix=not o.strict_dtype, full=o.full)
    check_adapter_dtype(lora.adapter_dtype, q, backend)
    if o.full:
        check_full(q, backend, o.loss, several=o.gpus * o.nodes > 1 or strategy is not None)
    warnings = ck_warnings + loss_notes + warnings
    if model is not None and spec_origin(model) == "user, shadows bundled":
        warnings.insert(0, f"model {model!r} is your spec in {user_spec_dir()}, which shadows the bundled one "
                           "(`qplan models` marks it)")
    if calib is not None and gpu_ is not None and calib["device"] != gpu_.name:
        raise QPlanError(f"calibration file {calibration} was fitted on {calib['device']}, not {gpu_.name}")
    dist = None
    if gpus * nodes > 1 or strategy is not None or cpu_offload or network_gbps is not None:
        dist = DistSettings(gpus, nodes, strategy or "ddp", cpu_offload, network_gbps)
        dist.validate(q, backend)
    if lora.fa and o.full:
        raise QPlanError("--optimizer lorafa is LoRA-FA (PEFT's optimizer for LoRA's A and B): not for --full")
    if lora.fa:
        warnings.append(check_lorafa(lora, backend, dist))
    if o.full and dist is not None and (dist.strategy != "fsdp" or dist.cpu_offload):
        raise QPlanError("--full over several GPUs is planned with --strategy fsdp (FSDP2 full shard) without "
                         "--cpu-offload; DDP, ZeRO and offloading are not planned yet")
    if peft is not None:
        check_method(peft, q, backend, dist, o.loss)
        warnings += method_warnings(peft)
    if o.objective != "sft":
        warnings.append(objective_note(o))
    return PlanInputs(spec, lora, q, training, gpu_, backend, tokens, o.price_per_hour, calib, dist, data,
                      o.full, peft), warnings


def check_lorafa(lora: LoraSettings, backend: str, dist: DistSettings | None) -> str:
    """One line for what LoRA-FA (``--optimizer lorafa``, PEFT's ``create_lorafa_optimizer``) is not planned with,
    or what PEFT's ``LoraFAOptimizer`` cannot do: it pairs the parameters whose names hold ``lora`` two by two
    (``lora_A`` then ``lora_B``), so DoRA's ``lora_magnitude_vector`` breaks the pairs. Else the plan's warning: what
    PEFT's one GPU run of it measured (reports/peft-metamathqa/)."""
    if lora.use_dora:
        raise QPlanError("--optimizer lorafa with --dora: PEFT's LoraFAOptimizer pairs the lora_* parameters two by "
                         "two (A, B) and DoRA's lora_magnitude_vector breaks the pairs; drop --dora")
    if lora.target_parameters:
        raise QPlanError("--optimizer lorafa with --target-parameters (LoRA on fused expert parameters) is not planned")
    if lora.adapter_dtype != "float32":
        raise QPlanError("--optimizer lorafa is planned with fp32 adapters (PEFT's own): leave out --adapter-dtype")
    if backend != "peft":
        raise QPlanError(f"--optimizer lorafa is PEFT's LoRA-FA optimizer, for the peft backend, not {backend}")
    if dist is not None:
        raise QPlanError("--optimizer lorafa over several GPUs is not planned (PEFT's LoraFAOptimizer reads whole "
                         "lora_A / lora_B tensors, not shards)")
    return ("LoRA-FA: lora_A is frozen, so its input is not saved and these live tensors are fewer than LoRA's; PEFT's "
            "one GPU run of it (Llama-3.2-3B, L40S) reserved 12% above them, as much as LoRA did: budget LoRA's peak "
            "until `qplan calibrate` has measured your device (its step time is not planned: a pseudo-inverse per "
            "module per step)")


def liger_kernels(names: str, spec: ModelSpec, backend: str, strategy: str | None) -> tuple[str, ...]:
    """``--liger-kernels`` as ``vocab.LIGER_KERNELS`` (in that order), where qplan plans them, else one line: the
    peft backend (Unsloth has its own kernels), a model type liger-kernel patches, RMSNorm models (LayerNorm ones have
    Liger's LayerNorm, not planned), a SwiGLU MLP (a SiLU-gated one; GEGLU's kernel is not planned)."""
    asked = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in asked if n not in LIGER_KERNELS]
    if unknown:
        raise QPlanError(f"--liger-kernels: unknown kernel {unknown[0]!r} (choose from {', '.join(LIGER_KERNELS)})")
    if not asked:
        return ()
    if backend != "peft":
        raise QPlanError(f"--liger-kernels is for the peft backend: the {backend} backend has its own kernels")
    if spec.model_type not in LIGER_MODEL_TYPES:
        raise QPlanError(f"--liger-kernels: liger-kernel 0.8.0 has no patch for model type {spec.model_type!r}")
    c = spec.config.get("text_config") if isinstance(spec.config.get("text_config"), dict) else spec.config
    norms = {p.module_type for p in spec.inventory.params if p.module_type.endswith(("RMSNorm", "LayerNorm"))}
    if "rms_norm" in asked and not all(n.endswith("RMSNorm") for n in norms):
        raise QPlanError(f"--liger-kernels rms_norm: {spec.name} has LayerNorms (Liger's LayerNorm is not planned)")
    if "swiglu" in asked and not (dims(spec).gated and c.get("hidden_act", c.get("hidden_activation")) in ("silu", "swish")):
        raise QPlanError(f"--liger-kernels swiglu: {spec.name}'s MLP is not SiLU-gated (Liger's GEGLU is not planned)")
    if "swiglu" in asked and moe_dims(spec) is not None:
        raise QPlanError(f"--liger-kernels swiglu: {spec.name} is a mixture of experts (Liger's expert MLP is not "
                         "planned)")
    if strategy is not None and strategy != "ddp":
        raise QPlanError(f"--liger-kernels with --strategy {strategy} is not planned yet: use ddp")
    return tuple(k for k in LIGER_KERNELS if k in asked)


def check_adapter_dtype(adapter: str, q: QuantSettings, backend: str) -> None:
    """``--adapter-dtype`` other than fp32 where a trainer runs it: under autocast, bf16 adapters with bf16 compute, and a
    quantized model's under fp16 (TRL casts a quantized model's adapters to bf16 whatever the compute dtype) — fp16
    adapters under fp16 autocast stop at the Trainer's ``GradScaler``
    (it refuses to unscale fp16 gradients), and adapters in the other 16-bit dtype would be cast by every matmul;
    without autocast, the weights' own dtype (a pure 16-bit step, torchtune's); PEFT makes them fp32 for Unsloth."""
    if adapter == "float32":
        return
    name = {"bfloat16": "bf16", "float16": "fp16"}[adapter]
    if backend != "peft":
        raise QPlanError(f"--adapter-dtype {name} is for the peft backend: the {backend} backend keeps its adapters "
                         "as it makes them")
    amp = q.compute_dtype in ("bfloat16", "float16")
    trl_t4 = q.kbit and adapter == "bfloat16" and q.compute_dtype == "float16"  # TRL's QLoRA where bf16 is missing
    if amp and adapter != q.compute_dtype and not trl_t4:
        raise QPlanError(f"--adapter-dtype {name} with compute dtype {q.compute_dtype}: qplan plans 16-bit adapters "
                         "in the compute dtype, bf16 adapters of a quantized model under fp16 (TRL's), or fp32")
    if amp and adapter == "float16":
        raise QPlanError("--adapter-dtype fp16 under fp16 autocast: the Trainer's GradScaler refuses to unscale fp16 "
                         "gradients; use --adapter-dtype fp32, or bf16 with --compute-dtype bf16")
    if not amp and adapter != q.unquantized_dtype:
        raise QPlanError(f"--adapter-dtype {name} without autocast: a pure 16-bit step keeps its adapters in the "
                         f"weights' dtype ({q.unquantized_dtype}) or fp32")


def check_fused_loss(loss: str, spec: ModelSpec, q: QuantSettings, gpu: Any, backend: str,
                     strategy: str | None) -> list[str]:
    """``--loss cce`` / ``trl`` / ``liger`` where the loss runs as planned, else one line; the warnings of a plan that
    runs with what is not planned. All read the head's weight directly; Unsloth computes its own fused loss. Cut
    Cross Entropy: its kernels need bf16 (Ampere or newer: ``cce_linear_cross_entropy`` raises on ``not
    torch.cuda.is_bf16_supported()``), qplan traces axolotl's generic patch of a ``*ForCausalLM`` forward, and FSDP /
    ZeRO-3 gather the sharded head inside the loss (not planned). TRL's fused head runs on any model TRL trains
    (``add_fused_lm_head`` reads the text config); under ZeRO-3 it gathers the head for the loss. Liger patches the
    model types it lists (``LIGER_MODEL_TYPES``); FSDP / ZeRO-3 gather the head inside its loss as for CCE."""
    name = {"cce": "Cut Cross Entropy", "trl": "TRL's fused LM head", "liger": "Liger's fused linear cross-entropy"}[loss]
    if backend != "peft":
        raise QPlanError(f"--loss {loss} is for the peft backend: the {backend} backend computes its own fused "
                         "cross-entropy")
    head = next((g for g in spec.inventory.linear if g.pattern == spec.inventory.output_head), None)
    if head is not None and head.keep_fp32 and q.unquantized_dtype != "float32":
        raise QPlanError(f"--loss {loss}: this model keeps its head in fp32 and its hidden states in "
                         f"{q.unquantized_dtype}; qplan plans {name} with both in one dtype")
    if loss == "trl":
        if strategy == "zero3":
            return ["--loss trl under ZeRO-3: TRL gathers the whole head (vocabulary x hidden) for the loss, which "
                    "the plan does not count"]
        return []
    if strategy in ("fsdp", "zero3", "hsdp"):
        raise QPlanError(f"--loss {loss} with --strategy {strategy} (the head's weight gathered inside the loss) is not "
                         "planned yet: use ddp or zero2")
    if loss == "liger":
        if spec.model_type not in LIGER_MODEL_TYPES:
            raise QPlanError(f"--loss liger: liger-kernel 0.8.0 has no patch for model type {spec.model_type!r} "
                             f"({spec.name})")
        return []
    if gpu is not None and not gpu.bf16:
        raise QPlanError(f"--loss cce: {name} needs an Ampere or newer GPU (bf16); {gpu.name} has none")
    if not spec.inventory.architecture.endswith("ForCausalLM"):
        raise QPlanError(f"--loss cce: {spec.name} is a {spec.inventory.architecture}, not a *ForCausalLM: qplan "
                         f"plans {name} for causal language models only")
    return []


def build_plan(inp: PlanInputs, warnings: list[str] | None = None) -> PlanDoc:
    """The plan document of ``inp``: the profile chosen up front (``planner.memory.profiles``) computes
    the memory; counts, compute, time and cost are the same for every profile."""
    spec, lora, q, t = inp.spec, inp.lora, inp.quant, inp.training
    if inp.backend not in BACKENDS:
        raise QPlanError(f"unknown backend {inp.backend!r}: choose one of {', '.join(BACKENDS)}")
    t.validate(spec)
    lora_plan = not inp.full and inp.peft is None
    for note in (unquantized_experts_warning(spec, q), moved_targets_warning(spec, lora) if lora_plan else None,
                 accuracy_warning(spec, lora.use_dora)):
        if note:
            warnings = [*(warnings or []), note]
    counts = plan_counts(inp)
    if t.loss != "full" and any(c.module == spec.inventory.output_head and c.kind != "full" for c in counts):
        raise QPlanError(f"--loss {t.loss}: the fused loss reads {spec.inventory.output_head}.weight as it is, so a "
                         "LoRA or a modules_to_save copy of the head is not planned: leave the head out of --targets "
                         "and --modules-to-save")
    note = text_only_warning(spec, counts)
    if note:
        warnings = [*(warnings or []), note]
    trainable = trainable_params(counts)
    base = base_params(spec)
    total = base + added_params(counts)
    ctx = StepContext.build(spec, lora, q, t, counts, inp.gpu, inp.backend, inp.calibration, inp.dist)
    profile = select_profile(inp.backend, inp.dist)
    mem = profile.memory(ctx, "cuda")
    cpu = profile.memory(ctx, "cpu")
    notes = profile.notes(ctx)
    if notes:
        warnings = [*(warnings or []), *notes]
    memory = memory_document(mem)
    # vLLM colocated without sleep holds its share of the GPU all run: the trainer has the rest
    usable = inp.gpu.usable_bytes - (t.grpo.vllm_held if t.grpo else 0) if inp.gpu else None
    prediction = {
        "method": "analytic",
        "params": {
            "base": base,
            "trainable": trainable,
            "total": total,
            "trainable_share": round(trainable / total, 8) if total else 0.0,
            "per_module": [c.to_json(BYTES[c.dtype]) for c in counts],
        },
        "adapter_file_bytes": None if inp.full else adapter_file_bytes(spec, counts),
        "memory": memory,
        "host": profile.host(ctx, mem),
        "memory_detail": {
            "weights": mem["weights_detail"],
            "optimizer_paged": mem["optimizer_paged"],
            "cuda_context": mem["cuda_context"],
            "allocator_slack": mem["allocator_slack"],
            "peak_phase": mem["peak_phase"],
            "phases": mem["phases"],
            # the same step run on the CPU (qplan run --device cpu compares with this)
            "tensor_peak_cpu": cpu["tensor_peak"],
            # what each moment's bytes are (tracker categories; each adds up to its phase), and
            # the moments for CPU kernels: a report draws the moment where a run's peak was measured
            "composition": mem["composition"],
            "peak_phase_cpu": cpu["peak_phase"],
            "phases_cpu": cpu["phases"],
            "composition_cpu": cpu["composition"],
        },
        "fits": (memory["peak"] <= usable) if usable is not None else None,
        "headroom": (usable - memory["peak"]) if usable is not None else None,
    }
    prediction.update(compute_prediction(inp, counts, trainable))
    if inp.data is not None:
        prediction["data"] = section(DataSection, inp.data)
    if t.grpo is not None:
        prediction["generation"] = generation_section(t, mem, spec, q, ctx.weights)
    inv = spec.inventory
    prediction["params"] = section(Params, prediction["params"])
    prediction["memory"] = section(Memory, prediction["memory"])
    return PlanDoc(
        schema_version=PLAN_SCHEMA_VERSION,
        qplan_version=__version__,
        model=ModelSection(name=spec.name, source=spec.source, architecture=inv.architecture,
                           model_type=inv.model_type, config=spec.config),
        method="full" if inp.full else inp.peft.method if inp.peft is not None else msgspec.UNSET,
        lora=section(LoraSection, {**lora.to_json(), **resolve_targets(spec, lora).to_json()}) if lora_plan else None,
        **({} if inp.peft is None else {inp.peft.method: section(METHOD_SECTIONS[inp.peft.method],
                                                                 inp.peft.to_json(spec))}),
        quant=section(QuantSection, q.to_json()),
        training=section(TrainingSection, {**t.to_json(), "mixed_precision": MIXED_PRECISION[q.compute_dtype]}),
        gpu=None if inp.gpu is None else GpuSection(name=inp.gpu.name, usable_bytes=inp.gpu.usable_bytes,
                                                    total_bytes=inp.gpu.total_bytes, bf16=inp.gpu.bf16),
        backend=inp.backend,
        distributed=msgspec.UNSET if (dist := profile.section(ctx, mem)) is None else section(DistributedSection, dist),
        warnings=list(warnings or []),
        prediction=section(Prediction, prediction),
    )


def plan_counts(inp: PlanInputs) -> list:
    """The LoRA counts of a plan (PEFT's trainable tensors, module by module); biases and
    ``modules_to_save`` train in the unquantized dtype."""
    q = inp.quant
    if inp.full:
        return count_full(inp.spec, q)
    if inp.peft is not None:
        return inp.peft.count(inp.spec, q)
    return count_lora(inp.spec, inp.lora, {"bias": q.unquantized_dtype, "modules_to_save": q.unquantized_dtype})


def compute_prediction(inp: PlanInputs, counts: list, trainable: int) -> dict[str, Any]:
    """``prediction.compute`` (FLOPs and bytes of one optimizer step), ``time`` and ``cost``."""
    from qplan.planner.compute.comm import comm_time, gathered_bytes
    from qplan.planner.compute.flops import not_counted, reference_forward_flops, step_bytes, step_flops
    from qplan.planner.compute.ops import step_launches
    from qplan.planner.compute.timing import cost_prediction, time_prediction
    from qplan.planner.memory.terms import gradient_bytes

    t, q = inp.training, inp.quant
    flops = step_flops(inp.spec, counts, inp.lora.r, q, *t.shape, t.grad_ckpt, t.attn_impl, t.grad_accum, t.loss)
    if t.objective in PREFERENCE_OBJECTIVES:  # the forwards without grad on the same rows: DPO's reference; KTO's
        # policy on the KL rows, then the reference on the KL rows and on the batch's (none when precomputed)
        args = (inp.spec, counts, inp.lora.r, q, *t.shape, t.attn_impl, t.grad_accum)
        ref = 0 if t.precompute_ref_log_probs else reference_forward_flops(*args) * (2 if t.objective == "kto" else 1)
        flops["reference"] = ref + (reference_forward_flops(*args, adapters=True) if t.objective == "kto" else 0)
        flops["total"] += flops["reference"]
    moved = step_bytes(inp.spec, counts, inp.lora.r, q, t.grad_ckpt, t.optimizer, trainable, t.grad_accum, t.shape)
    launches = step_launches(inp.spec, counts, q, t, inp.lora) if inp.backend != "unsloth" else None
    if t.grpo is not None:  # the generation batches of the step (transformers' generate)
        generation_work(inp, counts, flops, moved, launches)
    # the data's tokens (prompt tuning's virtual tokens run through the model but are not the user's tokens)
    tokens_per_step = t.shape[0] * (t.shape[1] - t.virtual_tokens) * t.grad_accum
    device = inp.gpu.to_json() if inp.gpu is not None else None
    gpus = inp.dist.world if inp.dist is not None else 1
    # (Unsloth's fused Triton kernels launch far fewer kernels than the eager PEFT step the count models: not counted)
    comm = (None, [] if launches is not None else ["the host's kernel launches (Unsloth's fused kernels: not counted)"])
    if inp.dist is not None and inp.dist.world > 1:
        gathered = (gathered_bytes(inp.spec, q, counts, inp.dist.shard_world, inp.dist.shard_strategy)
                    if inp.dist.shard_strategy in ("fsdp", "zero3") else (0, 0))
        shard = gradient_bytes(sharded_counts(counts, inp.dist.shard_world)) if inp.dist.strategy == "hsdp" else 0
        comm = comm_time(inp.dist, device, t.grad_accum, gradient_bytes(counts), gathered, shard)
    trained = q.unquantized_dtype if inp.full else inp.lora.adapter_dtype  # the dtype the trained tensors' matmuls see
    time = time_prediction(flops, moved, device, (q.quant, q.compute_dtype, trained), tokens_per_step,
                           inp.tokens, inp.calibration, gpus, launches["total"] if launches else 0, comm)
    if inp.tokens is not None and time is None:
        raise QPlanError("--tokens / --dataset-tokens need --gpu: the time of a step depends on the device")
    if inp.tokens is not None and time.get("step_seconds") is None:
        raise QPlanError(f"--tokens: no step time to total: {time.get('reason')}")
    if inp.calibration is not None and inp.gpu is None:
        raise QPlanError("--calibration needs --gpu: the device the calibration was fitted on")
    missing = not_counted(inp.spec, inp.lora.use_dora)
    if t.grpo is not None:
        missing.append("GRPO: the reward functions, and the decode's kernel launches (counted as a training "
                       "forward's per token): not checked against a GPU run of GRPO")
    if t.objective in PREFERENCE_OBJECTIVES and flops["reference"]:  # FLOPs counted; the roofline and launches not
        name, rows = t.objective.upper(), ", ".join(["reference"] * (not t.precompute_ref_log_probs)
                                                    + ["KL rows"] * (t.objective == "kto"))
        missing.append(f"{name}'s forwards without grad ({rows}) in the step time's memory traffic and kernel launches "
                       f"(their FLOPs are counted): the time is a lower bound, not checked against a GPU run of {name}")
    if t.precompute_ref_log_probs:
        missing.append("the precompute_ref_log_probs pass before training (a forward without grad over the training set)")
    compute = Compute(flops_per_step=section(Flops, flops), bytes_per_step=section(Moved, moved),
                      kernel_launches_per_step=section(Launches, launches) if launches else msgspec.UNSET,
                      flops_counted_as="torch.utils.flop_counter.FlopCounterMode (2 m k n per matmul)",
                      not_counted=missing or msgspec.UNSET)
    cost = cost_prediction(time, inp.price_per_hour, gpus)
    return {
        "compute": compute,
        "time": None if time is None else section(Time, time),
        "cost": None if cost is None else section(Cost, cost),
    }


def attach_trace(plan: dict[str, Any], traced: dict[str, Any], pre: dict[str, Any] | None = None) -> dict[str, Any]:
    """Put a trace of the plan's step (``qplan.observe.trace.trace_plan``) beside the analytic terms, and let it
    decide the verdict: the traced tensor peak plus the same overhead (the CUDA context, the allocator's slack as the
    same fraction of the peak) is ``trace.peak``, and ``fits`` / ``headroom`` are against it (the usable bytes are
    the analytic verdict's: its peak plus its headroom). GRPO: the trace is the training step's; generation's moment
    (analytic, checked against a tracked real generate) counts too; ``pre``: the traced precompute_ref_log_probs pass."""
    p = plan["prediction"]
    mem, detail = p["memory"], p["memory_detail"]
    gen = (p.get("generation") or {}).get("tensor_peak", 0)
    tensor_peak = max(int(traced["tensor_peak"]), gen, int(pre["tensor_peak"]) if pre else 0)
    slack = round(detail["allocator_slack"] * tensor_peak / mem["tensor_peak"]) if mem["tensor_peak"] else 0
    peak = tensor_peak + detail["cuda_context"] + slack
    if p.get("headroom") is not None:
        usable = mem["peak"] + p["headroom"]
        p["fits"], p["headroom"] = peak <= usable, usable - peak
        if p["fits"]:
            plan.pop("suggestions", None)  # what would make the analytic plan fit is moot
    p["method"] = "trace"
    p["trace"] = {
        "peak": peak,
        "overhead": peak - tensor_peak,
        "tensor_peak": tensor_peak,
        "breakdown_at_peak": {k: int(v) for k, v in traced["breakdown_at_peak"].items()},
        "phase_peaks": {k: int(v) for k, v in traced.get("phase_peaks", {}).items()},
        "trainable_params": int(traced["trainable_params"]),
        "notes": list(traced.get("notes", [])) + (["GRPO: the traced step's peak, or generation's moment (analytic: "
                                                   "prediction.generation) where that is larger"] if gen else [])
        + (["the traced step's peak, or the traced precompute_ref_log_probs pass's where that is larger: "
            f"{int(pre['tensor_peak']):,} bytes"] if pre else []),
    }
    if "host_peak" in traced:  # the Unsloth trace books offloaded checkpoints as host memory
        plan["prediction"]["trace"]["host_peak"] = int(traced["host_peak"])
    return plan
