"""The PEFT methods other than LoRA (``--peft-type``): which one a plan's options name, its settings, and what it is
not planned with yet. Each method's settings (``planner.model.ia3.Ia3Settings``,
``planner.model.prompt.PromptSettings``) carry its ``method`` name (``PlanDoc.method`` and the plan section's
name), ``to_json(spec)`` (that section) and ``count(spec)`` (its trained tensors); LoRA and its variants are the
``lora`` section's (``planner.model.lora``)."""

from __future__ import annotations

from qplan.planner.errors import QPlanError
from qplan.planner.memory.sharding import DistSettings
from qplan.planner.model.c3a import C3A_BLOCK, C3aSettings
from qplan.planner.model.ia3 import Ia3Settings
from qplan.planner.model.ln_tuning import LnTuningSettings
from qplan.planner.model.loha import LohaSettings
from qplan.planner.model.lokr import LokrSettings
from qplan.planner.model.miss import MISS_INITS, MissSettings
from qplan.planner.model.prompt import PromptSettings, PTuningSettings
from qplan.planner.model.vera import VeraSettings
from qplan.planner.model.weights import QuantSettings
from qplan.planner.options import PlanOptions, option_infos
from qplan.planner.vocab import PEFT_PLANNED, PEFT_TYPES, optimizer

#: the settings of a planned non-LoRA method
PeftSettings = (Ia3Settings | PromptSettings | PTuningSettings | LnTuningSettings | LohaSettings | LokrSettings
                | VeraSettings | MissSettings | C3aSettings)

#: the LoRA options a method other than LoRA (and --full) leaves no meaning to, with their defaults
LORA_ONLY = ("r", "alpha", "dropout", "targets", "bias", "dora", "rslora", "target_parameters", "modules_to_save",
             "adapter_dtype")

#: each method's own options among the LoRA section's, and the options only it takes
OWN_OPTIONS = {"ia3": ("targets",), "prompt_tuning": (), "p_tuning": (), "ln_tuning": ("targets",),
               "loha": ("r", "alpha", "targets"), "lokr": ("r", "alpha", "targets"), "vera": ("r", "targets"),
               "miss": ("r", "targets"), "c3a": ("targets",)}
METHOD_OPTIONS = {"feedforward_modules": (("ia3",), "--feedforward-modules"),
                  "num_virtual_tokens": (("prompt_tuning", "p_tuning"), "--num-virtual-tokens"),
                  "encoder_hidden_size": (("p_tuning",), "--encoder-hidden-size"),
                  "decompose_factor": (("lokr",), "--decompose-factor"),
                  "miss_init": (("miss",), "--miss-init"), "mini_r": (("miss",), "--mini-r"),
                  "block_size": (("c3a",), "--block-size")}
#: the prompt-learning methods: a trained prompt prepended to every row (``planner.model.prompt``)
PROMPT_METHODS = ("prompt_tuning", "p_tuning")


def _names(v: str | list[str]) -> tuple[str, ...]:
    return tuple(m.strip() for m in (v.split(",") if isinstance(v, str) else v) if m.strip())


def peft_method(o: PlanOptions) -> PeftSettings | None:
    """``--peft-type``: None for LoRA (and full fine-tuning), the method's settings otherwise; one line for a PEFT
    method qplan does not plan (by its name), an unknown name, an option of another method, or a LoRA option given
    to a method that has no use for it."""
    name = o.peft_type.strip().lower()
    if name not in PEFT_TYPES:
        raise QPlanError(f"--peft-type {o.peft_type!r} is not one of PEFT's methods (peft.PeftType): qplan plans "
                         f"{', '.join(PEFT_PLANNED)}")
    if name not in PEFT_PLANNED:
        raise QPlanError(f"--peft-type {name}: PEFT's {name} is not planned yet (qplan plans {', '.join(PEFT_PLANNED)}; "
                         "LoRA's variants with --dora, --rslora, --optimizer lorafa)")
    if o.full and name != "lora":
        raise QPlanError(f"--full trains every parameter, with no adapter: leave out --peft-type {name}")
    defaults = PlanOptions()
    for field, (owners, flag) in METHOD_OPTIONS.items():
        if name not in owners and getattr(o, field) != getattr(defaults, field):
            raise QPlanError(f"{flag} is an option of {' and '.join(owners)}: give it with --peft-type "
                             f"{' or '.join(owners)}")
    if name == "lora":
        return None
    for info in option_infos(PlanOptions):
        if (info.name in LORA_ONLY and info.name not in OWN_OPTIONS[name]
                and getattr(o, info.name) != getattr(defaults, info.name)):
            raise QPlanError(f"{info.flag} is a LoRA option: --peft-type {name} does not take it"
                             + (" (give --targets and --feedforward-modules)" if name == "ia3" else "")
                             + (" (give --targets: the norms to tune)" if name == "ln_tuning" else ""))
    if optimizer(o.optimizer).peft:
        raise QPlanError(f"--optimizer {o.optimizer} is LoRA-FA (LoRA's A and B): not for --peft-type {name}")
    if name in PROMPT_METHODS:
        config = {"prompt_tuning": "PromptTuningConfig", "p_tuning": "PromptEncoderConfig"}[name]
        if o.num_virtual_tokens is None:
            raise QPlanError(f"--peft-type {name} needs --num-virtual-tokens N (PEFT's {config} has no default: the "
                             "trained prompt is N × hidden_size)")
        if o.data is not None:
            raise QPlanError(f"--peft-type {name} with --data is not planned yet (every row grows by the virtual "
                             "tokens): give --seq-len, the longest row of your data")
        if name == "prompt_tuning":
            return PromptSettings(o.num_virtual_tokens)
        if o.encoder_hidden_size is None:
            raise QPlanError("--peft-type p_tuning needs --encoder-hidden-size H (PEFT's PromptEncoderConfig has no "
                             "default: its MLP is hidden_size → H → H → hidden_size)")
        return PTuningSettings(o.num_virtual_tokens, o.encoder_hidden_size)
    if name == "ln_tuning":
        return LnTuningSettings(o.targets)
    if name == "loha":
        return LohaSettings(o.r, o.alpha if o.alpha is not None else 2.0 * o.r, o.targets)
    if name == "vera":
        return VeraSettings(o.r, 1.0, o.targets)  # VeRA has no alpha: the shared field is unused
    if name == "c3a":
        return C3aSettings(16, 1.0, o.targets, o.block_size or C3A_BLOCK)  # C3A has no rank or alpha: unused fields
    if name == "miss":
        init = (o.miss_init if o.miss_init is not None else "true").strip().lower()
        if init not in MISS_INITS:
            raise QPlanError(f"--miss-init {o.miss_init!r}: PEFT's MissConfig.init_weights is one of {', '.join(MISS_INITS)}")
        if o.mini_r is not None and init != "mini":
            raise QPlanError("--mini-r is the width of --miss-init mini's block: give --miss-init mini")
        return MissSettings(o.r, 1.0, o.targets, init, o.mini_r or 1)  # MiSS has no alpha: the shared field is unused
    if name == "lokr":
        if o.decompose_factor == 0:
            raise QPlanError("--decompose-factor 0 divides nothing: give -1 (near the square root, PEFT's default) or a "
                             "divider >= 1")
        return LokrSettings(o.r, o.alpha if o.alpha is not None else 2.0 * o.r, o.targets,
                            o.decompose_factor if o.decompose_factor is not None else -1)
    ff = _names(o.feedforward_modules)
    if ff == ("none",):  # PEFT's feedforward_modules=[]: every target scales its output
        return Ia3Settings(o.targets, ())
    return Ia3Settings(o.targets, ff or None)


def check_method(peft: PeftSettings, q: QuantSettings, backend: str, dist: DistSettings | None, loss: str) -> None:
    """One line for what a method is not planned with yet: a k-bit base ((IA)³: PEFT's bitsandbytes IA3 layers clone
    and cast differently; prompt tuning: ``prepare_model_for_kbit_training``'s fp32 casts under a prompt are not
    traced yet), Unsloth (LoRA only), several GPUs, the fused losses."""
    name = peft.method
    if q.kbit:
        why = {"ia3": "PEFT's bnb IA3 layers clone and cast differently",
               "ln_tuning": "prepare_model_for_kbit_training's fp32 norms",
               "loha": "PEFT's LoHa has no bitsandbytes layer",
               "lokr": "PEFT's LoKr has no bitsandbytes layer"}.get(name, "not traced yet")
        raise QPlanError(f"--peft-type {name} on a {q.quant} (bitsandbytes) base is not planned yet ({why}): use "
                         "--quant bf16, fp16 or fp32")
    if backend != "peft":
        raise QPlanError(f"--peft-type {name} is planned for the peft backend (Unsloth trains LoRA), not {backend}")
    if dist is not None:
        raise QPlanError(f"--peft-type {name} over several GPUs is not planned yet: plan one GPU")
    if loss != "full":
        raise QPlanError(f"--peft-type {name} with --loss {loss} is not planned yet: use --loss full")


def method_warnings(peft: PeftSettings | None) -> list[str]:
    """What the plan of a method says about itself: prompt tuning's step time is below PEFT's GPU runs of it
    (reports/time: 25% under with 200 virtual tokens, not explained; p-tuning's run, 20 tokens: 6% under, as LoRA's
    spread; the memory of both is the traced step's)."""
    if peft is not None and peft.method == "prompt_tuning":
        return ["prompt tuning: the planned step time is 25% under PEFT's L40S runs of it (Llama-3.2-3B, 200 virtual "
                "tokens; reports/time), not explained yet: budget a third more time until `qplan calibrate` has "
                "measured your setup"]
    return []


def check_full_options(o: PlanOptions) -> None:
    """One line when a LoRA option is given with ``--full`` (it would be silently meaningless)."""
    defaults = PlanOptions()
    for info in option_infos(PlanOptions):
        if info.name in LORA_ONLY and getattr(o, info.name) != getattr(defaults, info.name):
            raise QPlanError(f"{info.flag} is a LoRA option: --full trains every parameter, with no adapter")
