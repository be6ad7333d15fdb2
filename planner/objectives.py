"""What a plan trains for besides the next token (``--objective``, ``vocab.TRAINING_OBJECTIVES``): the checks and
settings of each objective's trainer, read from TRL's source (1.16). ``dpo``: ``DPOTrainer``
(``trl/trainer/dpo_trainer.py``); ``kto``: ``KTOTrainer`` (``trl/trainer/kto_trainer.py``); ``reward``:
``RewardTrainer`` (``trl/trainer/reward_trainer.py``, a 16/32-bit base: ``planner.model.seq_cls``). With LoRA (DPO and
KTO QLoRA too) on one GPU or DDP ranks; DPO on ``--seq-len`` or on preference data (``--data``: ``planner.data.formats``'
``preference`` format), KTO on ``--seq-len`` or on unpaired completions (the ``unpaired`` format)."""


from __future__ import annotations

from dataclasses import replace
from typing import Any

from qplan.planner.compute.decode import generation_compute
from qplan.planner.document import GenerationSection, section
from qplan.planner.errors import QPlanError
from qplan.planner.memory.generation import GENERATION_MODEL_TYPES
from qplan.planner.memory.terms import GrpoSettings, TrainingSettings, adapter_bytes, max_context
from qplan.planner.model.lora import LoraSettings
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import base_params, weights_bytes
from qplan.planner.options import PlanOptions
from qplan.planner.vocab import PREFERENCE_OBJECTIVES

#: each objective's trainer (TRL's class) and config
TRAINERS = {"dpo": ("DPOTrainer", "DPOConfig"), "kto": ("KTOTrainer", "KTOConfig"),
            "reward": ("RewardTrainer", "RewardConfig"), "grpo": ("GRPOTrainer", "GRPOConfig")}

#: what every plan of the objective says of how it was planned
NOTES = {
    "dpo": ("DPO: planned as TRL 1.16's DPOTrainer runs it (traced on meta through its own _compute_loss); "
            "every position is planned as a completion token (the fused head scores fewer with a prompt), "
            "with --full the reference is the policy's checkpoint loaded again (TRL without PEFT), precompute_ref_log_probs' "
            "pass before training is phases.precompute, a ref_model of another checkpoint is not planned; "
            "with checkpointing, the last layer's backward at LoRA dropout 0 (DPO's) is planned up to 2% "
            "under the traced step (QLoRA; 0.6% in bf16)"),
    "reward": ("reward model: planned as TRL 1.16's RewardTrainer runs it (traced on meta through its own compute_loss): "
               "AutoModelForSequenceClassification with one label (the LM head replaced by a score head, whose copy "
               "PEFT trains: modules_to_save), each of the --batch-size pairs as a chosen and a rejected row, padded; "
               "disable_dropout: LoRA dropout 0"),
    "kto": ("KTO: planned as TRL 1.16's KTOTrainer runs it (traced on meta through its own _compute_loss): each of the "
            "--batch-size rows, the KL term's mismatched rows (another row's completion after each prompt, no grad, "
            "policy and reference) and the reference's forward; every position is planned as a completion token, "
            "with --full the reference is the policy's checkpoint loaded again (TRL without PEFT), precompute_ref_log_probs' "
            "pass before training is phases.precompute, a ref_model of another checkpoint is not planned"),
    "grpo": ("GRPO: planned as TRL 1.16's GRPOTrainer runs it with transformers' generate (no vLLM): the generation "
             "batch's prefill, KV cache and sampling (prediction.generation, checked against a tracked real generate), "
             "then each micro-batch of prompt + completion rows through the fused head (log-probabilities and "
             "entropy of the completion positions); every completion is planned max_completion_length long (no early "
             "EOS), every prompt as long as the longest"),
}


def objective_note(o: PlanOptions) -> str:
    """What a non-SFT plan says of how it was planned (``NOTES``); a GRPO plan generating with vLLM says so."""
    if o.objective == "grpo" and o.vllm:
        return (f"GRPO: planned as TRL 1.16's GRPOTrainer runs it with vLLM ({o.vllm}): vLLM's share of this GPU and "
                "its needs (prediction.generation.vllm) are derived from TRL's source, not measured; each micro-batch "
                "of prompt + completion rows through the fused head as with transformers' generate")
    return NOTES[o.objective]


def _trainer_refusal(o: PlanOptions, full_why: str | None, strategy_why: str) -> str | None:
    """What every TRL trainer here is not planned with yet (``None``: nothing), given the reasons for ``--full``
    (``None``: planned) and for a strategy other than DDP."""
    trainer, config = TRAINERS[o.objective]
    if o.full and full_why:
        return full_why
    if o.full and (o.gpus * o.nodes > 1 or o.strategy is not None or o.cpu_offload):
        return "--full over several GPUs is not planned yet (one GPU is)"
    if o.peft_type.strip().lower() != "lora":
        return f"--peft-type {o.peft_type} is not planned yet (LoRA and its variants are)"
    if o.backend != "peft":
        return f"the {o.backend} backend is not planned (TRL's {trainer} on PEFT is)"
    if o.strategy not in (None, "ddp") or o.cpu_offload:
        return f"{'--cpu-offload' if o.cpu_offload else '--strategy ' + str(o.strategy)} is not planned yet: {strategy_why}"
    if o.liger_kernels:
        return "--liger-kernels are not planned with it yet"
    if o.objective == "grpo":  # GRPOConfig.disable_dropout defaults to False: LoRA's dropout stays
        return None
    if o.dropout not in (None, 0.0):
        return f"--dropout {o.dropout}: {config}.disable_dropout (default True) sets every dropout to 0; leave --dropout out"
    return None


def check_preference(o: PlanOptions) -> str:
    """``--objective dpo|kto``: the loss it is planned with (TRL 1.16's trainers always compute the log-probabilities
    through their fused LM head: ``trl``), or one line for what is not planned with it yet."""
    name, trainer = o.objective, TRAINERS[o.objective][0]
    if o.loss not in ("full", "trl"):  # full: the option's default
        raise QPlanError(f"--objective {name} computes its log-probabilities with TRL's fused LM head ({trainer} "
                         f"always does): leave out --loss {o.loss}, or give --loss trl")
    why = _trainer_refusal(o, None,
                           "plan one GPU or DDP (TRL's fused head gathers an FSDP-sharded head whole, and DeepSpeed "
                           "prepares its own reference)")
    if why is None and o.data is not None and name == "dpo" and o.batching != "padding":
        why = (f"--batching {o.batching} is not how DPOTrainer batches its pairs (shuffled, each batch padded to its "
               "longest row): leave out --batching")
    elif why is None and o.data is not None and name == "kto" and o.batching not in ("padding", "sequential"):
        why = (f"--batching {o.batching} is not how KTOTrainer batches its rows (in file order, each batch padded to "
               "its longest row): leave out --batching")
    elif why is None and o.precompute_ref_log_probs and o.data is not None:
        why = ("--precompute-ref-log-probs with --data is not planned yet (the pass batches the file in order, padded "
               "to each batch's longest): give --seq-len")
    elif why is None and name == "kto" and o.batch_size < 2:
        why = ("--batch-size 1: KTOTrainer refuses it (the KL term pairs each prompt with another row's completion "
               "of the same batch: at least 2 rows)")
    if why:
        raise QPlanError(f"--objective {name}: {why}")
    return "trl"


GRPO_FLAGS = ("num_generations", "max_prompt_length", "max_completion_length", "steps_per_generation", "vllm",
              "vllm_gpu_memory_utilization")
#: TRL 1.16 ``GRPOConfig.vllm_gpu_memory_utilization``'s default
VLLM_UTILIZATION = 0.3


def check_objective_flags(o: PlanOptions) -> None:
    """One line when GRPO's own options are given to another objective, or DPO's/KTO's precomputation to another."""
    if o.objective not in PREFERENCE_OBJECTIVES and (o.precompute_ref_log_probs or o.precompute_ref_batch_size is not None):
        flag = "log-probs" if o.precompute_ref_log_probs else "batch-size"
        raise QPlanError(f"--precompute-ref-{flag} is an option of --objective dpo or kto (TRL's DPOConfig/KTOConfig), "
                         f"not of {o.objective}")
    if o.precompute_ref_batch_size is not None and not o.precompute_ref_log_probs:
        raise QPlanError("--precompute-ref-batch-size sizes the batches of --precompute-ref-log-probs' pass: give both")
    if o.objective != "grpo":
        given = [f for f in GRPO_FLAGS if getattr(o, f) is not None] + ["beta"] * (o.beta != 0.0) + \
            ["vllm_sleep"] * o.vllm_sleep
        if given:
            raise QPlanError(f"--{given[0].replace('_', '-')} is an option of --objective grpo (TRL's GRPOConfig), "
                             f"not of {o.objective}")


def vllm_settings(o: PlanOptions, gpu: Any) -> dict[str, Any]:
    """``--vllm``: TRL 1.16 ``VLLMGeneration`` (``trl/generation/vllm_generation.py``). Colocate builds
    ``vllm.LLM(gpu_memory_utilization=u, ...)`` in the trainer's process, after the trainer's model is on the GPU; vLLM
    takes ``u x`` the GPU's total memory for its copy of the weights, its activations and its KV blocks, and holds it
    all run — or, with ``vllm_enable_sleep_mode``, releases it after each generation (``sleep(level=2)``) and takes it
    back for the next. Server mode generates on the ``trl vllm-serve`` GPUs: nothing on this one. 8-bit bases are
    refused as TRL refuses them ("vLLM does not support in-flight 8-bit quantization")."""
    if o.vllm is None:
        if o.vllm_gpu_memory_utilization is not None or o.vllm_sleep:
            raise QPlanError("--vllm-gpu-memory-utilization and --vllm-sleep are for --vllm colocate")
        return {}
    if o.vllm == "server" and (o.vllm_gpu_memory_utilization is not None or o.vllm_sleep):
        raise QPlanError("--vllm server generates on the vLLM server's GPUs (trl vllm-serve sets its own "
                         "--gpu_memory_utilization): --vllm-gpu-memory-utilization and --vllm-sleep are for colocate")
    if o.quant == "int8":
        raise QPlanError("--vllm with --quant int8: vLLM does not support in-flight 8-bit quantization (TRL refuses it)")
    if o.vllm == "server":
        return {"vllm": "server"}
    if gpu is None:
        raise QPlanError("--vllm colocate takes a fraction of the GPU's memory (--vllm-gpu-memory-utilization): give --gpu")
    util = o.vllm_gpu_memory_utilization or VLLM_UTILIZATION
    return {"vllm": "colocate", "vllm_reserved": int(util * gpu.total_bytes), "vllm_sleep": o.vllm_sleep}


def check_grpo(o: PlanOptions, spec: ModelSpec, gpu: Any = None) -> tuple[GrpoSettings, int]:
    """``--objective grpo``: TRL 1.16 ``GRPOTrainer``'s generation settings (``GRPOConfig``'s defaults where not given:
    8 generations, 512-token completions, ``steps_per_generation = gradient_accumulation_steps``) and the training rows'
    length (the longest prompt plus the completion), or one line for what TRL refuses (``GRPOConfig.__post_init__``:
    fewer than 2 generations, a generation batch not a multiple of ``num_generations``) or qplan does not plan yet."""
    g = GrpoSettings(num_generations=o.num_generations or 8, prompt_length=o.max_prompt_length or 512,
                     max_completion_length=o.max_completion_length or 512,
                     steps_per_generation=o.steps_per_generation or o.grad_accum, beta=o.beta,
                     **vllm_settings(o, gpu))
    world = o.gpus * o.nodes
    batch = o.batch_size * world * g.steps_per_generation  # GRPOConfig.generation_batch_size
    why = _trainer_refusal(o, "--full is not planned yet (LoRA and its variants are)",
                           "plan one GPU or DDP (generation with an FSDP/ZeRO-sharded model is not planned)")
    if why is None and o.loss not in ("full", "trl"):
        why = f"--loss {o.loss}: GRPOTrainer scores the completions with TRL's fused LM head: leave out --loss"
    elif why is None and o.seq_len is not None:
        why = "--seq-len: a GRPO row is the prompt plus the completion: give --max-prompt-length and --max-completion-length"
    elif why is None and o.data is not None:
        why = "--data is not read as GRPOTrainer reads prompts yet: give --max-prompt-length (the longest prompt)"
    elif why is None and o.dora:
        why = "--dora is not planned in generation yet (DoRA's weight norm in each forward)"
    elif why is None and spec.model_type not in GENERATION_MODEL_TYPES and g.vllm is None:
        why = (f"generation is planned for {', '.join(GENERATION_MODEL_TYPES)} models (dense, full attention), not "
               f"{spec.model_type} ({spec.name})")
    elif why is None and g.vllm is None and (sw := spec.config.get("sliding_window")) \
            and spec.config.get("use_sliding_window", True) \
            and g.prompt_length + g.max_completion_length > sw:
        why = (f"prompt + completion ({g.prompt_length + g.max_completion_length}) beyond {spec.name}'s sliding window "
               f"({sw}): its sliding layers' cache is not planned yet")
    elif why is None and (ctx := max_context(spec)) and g.prompt_length + g.max_completion_length > ctx:
        why = (f"--max-prompt-length {g.prompt_length} + --max-completion-length {g.max_completion_length} exceeds "
               f"{spec.name}'s context of {ctx} tokens (max_position_embeddings)")
    elif why is None and g.num_generations < 2:
        why = (f"--num-generations {g.num_generations}: GRPO needs at least 2 generations per prompt for its "
               "advantages (GRPOConfig refuses fewer)")
    elif why is None and batch % g.num_generations:
        why = (f"the generation batch (--batch-size {o.batch_size} x {world} GPU(s) x --steps-per-generation "
               f"{g.steps_per_generation} = {batch}) must be divisible by --num-generations {g.num_generations} "
               "(GRPOConfig's generation_batch_size; TRL's per_device_train_batch_size defaults to 8)")
    if why:
        raise QPlanError(f"--objective grpo: {why}")
    return g, g.prompt_length + g.max_completion_length


def check_reward(o: PlanOptions) -> None:
    """``--objective reward``: one line for what TRL 1.16's ``RewardTrainer`` is not planned with yet."""
    if o.loss != "full":
        why = f"--loss {o.loss}: RewardTrainer scores each row with its head's one output (no logits to fuse)"
    elif o.quant in ("nf4", "fp4", "int8"):
        why = ("a quantized base is not planned yet (RewardTrainer casts the trained copy of the score head to bf16 "
               "with the adapters): leave out --quant (bf16), or give fp16 or fp32")
    elif o.data is not None:
        why = ("--data is not read as RewardTrainer reads it yet (it drops a pair with a row over max_length where "
               "DPOTrainer truncates): give --seq-len")
    else:
        why = _trainer_refusal(o, "--full is not planned yet (LoRA and its variants are)", "plan DDP")
    if why:
        raise QPlanError(f"--objective reward: {why}")


def kbit_note(objective: str) -> str:
    """What a DPO/KTO plan on a k-bit base says of its adapters' dtype."""
    trainer = TRAINERS[objective][0]
    return (f"{objective.upper()} on a quantized base: the LoRA tensors are planned in bf16, as {trainer} casts them "
            f"(TRL 1.16, after QLoRA's recipe), whatever --adapter-dtype says")


def kbit_adapters(lora: LoraSettings, objective: str) -> LoraSettings:
    """A DPO/KTO plan's LoRA on a k-bit base: TRL 1.16's ``DPOTrainer.__init__`` and ``KTOTrainer.__init__`` cast every
    trainable parameter of a quantized model but DoRA's ``lora_magnitude_vector`` to bf16 (``param.data =
    param.data.to(torch.bfloat16)``), so the adapters are bf16 whatever PEFT made them; one line for what that cast
    does that qplan's adapter dtype cannot say (DoRA's magnitudes left fp32 beside bf16 factors, ``modules_to_save``
    copies cast too)."""
    trainer = TRAINERS[objective][0]
    if lora.use_dora:
        raise QPlanError(f"--objective {objective} with --dora on a quantized base is not planned yet: {trainer} casts "
                         "LoRA's A and B to bf16 and keeps DoRA's magnitudes fp32 (TRL 1.16)")
    if lora.modules_to_save:
        raise QPlanError(f"--objective {objective} with --modules-to-save on a quantized base is not planned yet: "
                         f"{trainer} casts those copies to bf16 too (TRL 1.16)")
    return replace(lora, adapter_dtype="bfloat16")


#: the data format each objective trains on (``planner.data.formats``), and what it is
DATA_FORMAT = {"dpo": ("preference", "preference pairs (prompt, chosen, rejected)"),
               "reward": ("preference", "preference pairs (prompt, chosen, rejected)"),
               "kto": ("unpaired", "unpaired completions (prompt, completion, label)")}


def check_data_format(objective: str, fmt: str) -> None:
    """One line when the data's format is not the objective's: DPO trains on preference pairs
    (``prompt``/``chosen``/``rejected``), KTO on unpaired completions (``prompt``/``completion``/``label``), SFT on
    the other formats."""
    if objective in DATA_FORMAT and fmt != DATA_FORMAT[objective][0]:
        raise QPlanError(f"--objective {objective} trains on {DATA_FORMAT[objective][1]}, and --data is {fmt} data")
    for other, (f, what) in DATA_FORMAT.items():
        if fmt == f and DATA_FORMAT.get(objective, ("",))[0] != f:
            raise QPlanError(f"--data holds {what}: plan them with --objective {other}")


def generation_section(t: TrainingSettings, mem: dict[str, Any], spec: ModelSpec, q: Any,
                       weights: int) -> GenerationSection:
    """``prediction.generation`` of a GRPO plan: the generation batch and its moments (``memory.generation``), or, with
    vLLM, what vLLM needs and has (``vllm_budget``)."""
    g = t.grpo
    assert g is not None
    n = g.sequences(t.batch_size)
    out: dict[str, Any] = {
        "sequences": n, "prompts": max(1, n // g.num_generations), "prompt_length": g.prompt_length,
        "completion_length": g.max_completion_length, "tokens": n * g.max_completion_length,
        "tensor_peak": mem["phases"].get("generation")}
    if g.vllm is None:
        terms = mem["generation"]
        out.update({k: terms[k] for k in ("kv_cache", "sampling", "prefill", "decode", "sample", "dequant")})
    else:
        out.update(engine="vllm", **vllm_budget(g, spec, q, weights, n))
    return section(GenerationSection, out)


def vllm_budget(g: GrpoSettings, spec: ModelSpec, q: Any, weights: int, n: int) -> dict[str, Any]:
    """What vLLM needs for one generation batch and what it has, derived (vLLM does not run here): its copy of the
    weights (16-bit, or bitsandbytes 4-bit as TRL asks for a 4-bit base: ``quantization="bitsandbytes"``, planned as
    the trainer's 4-bit bytes), the KV blocks of ``N`` rows of ``P + C`` tokens in the model's 16-bit dtype
    (``2 x layers x kv_heads x head_dim x 2 x N x (P + C)``), and — colocate — the room its reservation leaves for KV
    blocks and activations after the weights. Fewer KV blocks than the batch needs make vLLM run fewer rows at once
    (slower, not out of memory)."""
    from qplan.planner.memory.generation import kv_cache_bytes
    from qplan.planner.memory.terms import dims

    vllm_weights = weights if q.kbit else 2 * base_params(spec)
    kv = kv_cache_bytes(dims(spec), 2, n, g.prompt_length + g.max_completion_length)
    out: dict[str, Any] = {"kv_cache": kv, "vllm": {
        "mode": g.vllm, "weights": vllm_weights, "kv_cache_needed": kv,
        "source": "derived from TRL 1.16 trl/generation/vllm_generation.py (vllm.LLM(gpu_memory_utilization=...)) "
                  "and vLLM's gpu_memory_utilization (a fraction of the whole GPU); not measured"}}
    if g.vllm == "colocate":
        room = g.vllm_reserved - vllm_weights
        out["vllm"].update(reserved=g.vllm_reserved, sleep=g.vllm_sleep, kv_and_activation_room=room)
        if room <= 0:
            raise QPlanError(f"--vllm colocate: vLLM's share of the GPU ({g.vllm_reserved / 2**30:.2f} GiB) does not "
                             f"hold its copy of the weights ({vllm_weights / 2**30:.2f} GiB): raise "
                             "--vllm-gpu-memory-utilization")
    return out


def generation_work(inp: Any, counts: list, flops: dict[str, int], moved: dict[str, int],
                    launches: dict[str, int] | None) -> None:
    """Add a GRPO plan's generation batches to the step's FLOPs, bytes and launches (``compute.decode``), in place."""
    t = inp.training
    # vLLM launches its decode steps as CUDA graphs: no per-kernel host cost is counted
    per_micro = launches["forward"] // t.grad_accum if launches and t.grpo.vllm is None else 0
    weights = weights_bytes(inp.spec, inp.quant)
    if t.grpo.vllm is None:
        gen = generation_compute(inp.spec, counts, inp.lora.r, inp.quant, t, weights, adapter_bytes(counts), per_micro)
    else:  # vLLM's own copy (the adapters merged into it at each weight sync), a 16-bit cache
        own = weights if inp.quant.kbit else 2 * base_params(inp.spec)
        gen = generation_compute(inp.spec, counts, inp.lora.r, inp.quant, t, own, 0, 0, kv_dtype_bytes=2)
    flops["generation"] = gen["flops"]
    flops["total"] += gen["flops"]
    moved["generation"] = gen["bytes"]
    moved["total"] += gen["bytes"]
    if launches and per_micro:
        launches["generation"] = gen["launches"]
        launches["total"] += gen["launches"]
