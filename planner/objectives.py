"""What a plan trains for besides the next token (``--objective``, ``vocab.TRAINING_OBJECTIVES``): the checks and
settings of each objective's trainer, read from TRL's source (1.16). ``dpo``: ``DPOTrainer``
(``trl/trainer/dpo_trainer.py``) with LoRA/QLoRA on one GPU, on ``--seq-len`` or on preference data (``--data``:
``planner.data.formats``' ``preference`` format)."""


from __future__ import annotations

from dataclasses import replace

from qplan.planner.errors import QPlanError
from qplan.planner.model.lora import LoraSettings
from qplan.planner.options import PlanOptions

#: what every DPO plan says of how it was planned
DPO_NOTE = ("DPO: planned as TRL 1.16's DPOTrainer runs it (traced on meta through its own _compute_loss); "
            "every position is planned as a completion token (the fused head scores fewer with a prompt), "
            "the precomputation pass of precompute_ref_log_probs and a separate ref_model are not planned; "
            "with checkpointing, the last layer's backward at LoRA dropout 0 (DPO's) is planned up to 2% "
            "under the traced step (QLoRA; 0.6% in bf16)")


def check_dpo(o: PlanOptions) -> str:
    """``--objective dpo``: the loss it is planned with (TRL 1.16's ``DPOTrainer`` always computes the log-probabilities
    through its fused LM head: ``trl``), or one line for what is not planned with it yet."""
    if o.loss not in ("full", "trl"):  # full: the option's default
        raise QPlanError(f"--objective dpo computes its log-probabilities with TRL's fused LM head (DPOTrainer always "
                         f"does): leave out --loss {o.loss}, or give --loss trl")
    why = None
    if o.full:
        why = "--full (a separate reference model) is not planned yet"
    elif o.peft_type.strip().lower() != "lora":
        why = f"--peft-type {o.peft_type} is not planned yet (LoRA and its variants are)"
    elif o.backend != "peft":
        why = f"the {o.backend} backend is not planned (TRL's DPOTrainer on PEFT is)"
    elif o.strategy not in (None, "ddp") or o.cpu_offload:
        why = (f"{'--cpu-offload' if o.cpu_offload else '--strategy ' + str(o.strategy)} is not planned yet: plan one "
               "GPU or DDP (TRL's fused head gathers an FSDP-sharded head whole, and DeepSpeed prepares its own "
               "reference)")
    elif o.data is not None and o.batching != "padding":
        why = (f"--batching {o.batching} is not how DPOTrainer batches its pairs (shuffled, each batch padded to its "
               "longest row): leave out --batching")
    elif o.liger_kernels:
        why = "--liger-kernels are not planned with it yet"
    elif o.dropout not in (None, 0.0):
        why = (f"--dropout {o.dropout}: DPOConfig.disable_dropout (default True) sets every dropout to 0; leave "
               "--dropout out")
    if why:
        raise QPlanError(f"--objective dpo: {why}")
    return "trl"


#: what a DPO plan on a k-bit base says of its adapters' dtype
DPO_KBIT_NOTE = ("DPO on a quantized base: the LoRA tensors are planned in bf16, as DPOTrainer casts them (TRL 1.16 "
                 "dpo_trainer.py, after QLoRA's recipe), whatever --adapter-dtype says")


def dpo_kbit_adapters(lora: LoraSettings) -> LoraSettings:
    """A DPO plan's LoRA on a k-bit base: TRL 1.16's ``DPOTrainer.__init__`` casts every trainable parameter of a
    quantized model but DoRA's ``lora_magnitude_vector`` to bf16 (``param.data = param.data.to(torch.bfloat16)``),
    so the adapters are bf16 whatever PEFT made them; one line for what that cast does that qplan's adapter dtype
    cannot say (DoRA's magnitudes left fp32 beside bf16 factors, ``modules_to_save`` copies cast too)."""
    if lora.use_dora:
        raise QPlanError("--objective dpo with --dora on a quantized base is not planned yet: DPOTrainer casts LoRA's "
                         "A and B to bf16 and keeps DoRA's magnitudes fp32 (TRL 1.16)")
    if lora.modules_to_save:
        raise QPlanError("--objective dpo with --modules-to-save on a quantized base is not planned yet: DPOTrainer "
                         "casts those copies to bf16 too (TRL 1.16)")
    return replace(lora, adapter_dtype="bfloat16")


def check_data_format(objective: str, fmt: str) -> None:
    """One line when the data's format is not the objective's: DPO trains on preference pairs
    (``prompt``/``chosen``/``rejected``), SFT on the other formats."""
    if objective == "dpo" and fmt != "preference":
        raise QPlanError(f"--objective dpo trains on preference pairs (prompt, chosen, rejected), and --data is "
                         f"{fmt} data")
    if objective != "dpo" and fmt == "preference":
        raise QPlanError("--data holds preference pairs (prompt, chosen, rejected): plan them with --objective dpo")
