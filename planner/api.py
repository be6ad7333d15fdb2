"""qplan's library API: one call from options to the plan document.

    from qplan.planner.api import make_plan
    plan = make_plan(model="llama-3.2-3b", r=32, gpu="t4")      # == qplan estimate --format json

The CLI, the benchmarks and the tests call this; so will anything that serves plans (a web page,
a trainer-config importer). Keyword names and defaults are the CLI's options. Torch-free for
bundled specs; a config path builds its inventory with transformers on the meta device.
Bad input raises ``QPlanError`` with one line that names the option and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .distributed import DistSettings
from .errors import QPlanError
from .lora import LoraSettings, default_dropout
from .memory import TrainingSettings, resolve_attn
from .plan import PlanInputs, build_plan, check_gpu_dtype
from .schema import check_options, read_calibration
from .spec import Gpu, ModelSpec
from .specs import load_gpu, load_spec, spec_origin, user_spec_dir
from .vocab import DTYPE_ALIASES
from .weights import QuantSettings, checkpoint_quant


def plan_inputs(
    *,
    model: str | ModelSpec,
    r: int = 16,
    alpha: float | None = None,
    dropout: float | None = None,
    targets: str = "all-linear",
    bias: str = "none",
    dora: bool = False,
    rslora: bool = False,
    modules_to_save: str | Iterable[str] = (),
    target_parameters: str | Iterable[str] = (),
    quant: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bf16",
    upcast: bool = True,
    gpu: str | Gpu | None = None,
    seq_len: int = 512,
    batch_size: int = 1,
    grad_accum: int = 1,
    grad_ckpt: bool = True,
    optimizer: str = "adamw_torch",
    attn_impl: str = "auto",
    backend: str = "peft",
    strict_dtype: bool = False,
    tokens: int | None = None,
    dataset_tokens: int | None = None,
    epochs: float | None = None,
    price_per_hour: float | None = None,
    calibration: str | None = None,
    gpus: int = 1,
    nodes: int = 1,
    strategy: str | None = None,
    cpu_offload: bool = False,
) -> tuple[PlanInputs, list[str]]:
    """The validated inputs of a plan (and the warnings resolving them produced).

    Every option is checked against ``schema.PlanOptions`` (types, bounds, choices) before any
    work; a violation is one line naming the CLI flag."""
    opts = dict(r=r, alpha=alpha, dropout=dropout, targets=targets, bias=bias, dora=dora, rslora=rslora,
                modules_to_save=modules_to_save if isinstance(modules_to_save, str) else list(modules_to_save),
                target_parameters=target_parameters if isinstance(target_parameters, str) else list(target_parameters),
                quant=quant, double_quant=double_quant, compute_dtype=compute_dtype, upcast=upcast, seq_len=seq_len,
                batch_size=batch_size, grad_accum=grad_accum, grad_ckpt=grad_ckpt, optimizer=optimizer,
                attn_impl=attn_impl, backend=backend, strict_dtype=strict_dtype, tokens=tokens,
                dataset_tokens=dataset_tokens, epochs=epochs, price_per_hour=price_per_hour, calibration=calibration,
                gpus=gpus, nodes=nodes, strategy=strategy, cpu_offload=cpu_offload)
    check_options(opts)
    if tokens is not None and (dataset_tokens is not None or epochs is not None):
        raise QPlanError("give either --tokens or --dataset-tokens with --epochs, not both")
    if (dataset_tokens is None) != (epochs is None):
        raise QPlanError("--dataset-tokens and --epochs go together (tokens trained = dataset tokens x epochs)")
    if dataset_tokens is not None and epochs is not None:
        tokens = max(1, math.ceil(dataset_tokens * epochs))
    calib = read_calibration(calibration) if calibration else None
    if isinstance(model, str) and not model.strip():
        raise QPlanError("--model is empty: give a bundled name (see `qplan models`), a config.json or a model folder")
    if isinstance(gpu, str) and not gpu.strip():
        raise QPlanError("--gpu is empty: give a GPU name (see `qplan gpus`) or leave the option out")
    spec = model if isinstance(model, ModelSpec) else load_spec(model)
    gpu_ = gpu if isinstance(gpu, Gpu) or gpu is None else load_gpu(gpu)
    if isinstance(modules_to_save, str):
        modules_to_save = modules_to_save.split(",")
    if isinstance(target_parameters, str):
        target_parameters = target_parameters.split(",")
    if dropout is None:
        dropout = default_dropout(spec, targets, tuple(m.strip() for m in target_parameters if m.strip()))
    lora = LoraSettings(
        r=r, alpha=alpha if alpha is not None else 2.0 * r, dropout=dropout, targets=targets, bias=bias,
        use_dora=dora, use_rslora=rslora, modules_to_save=tuple(m.strip() for m in modules_to_save if m.strip()),
        target_parameters=tuple(m.strip() for m in target_parameters if m.strip()),
    )
    # Unsloth's prepare_model_for_training (unsloth_zoo 2026.10.9 training_utils.py) casts only the LoRA
    # weights to fp32: embeddings, head, norms and biases keep the load dtype (no kbit upcast)
    q = QuantSettings(quant, double_quant, DTYPE_ALIASES[compute_dtype], upcast and backend != "unsloth")
    q, ck_warnings = checkpoint_quant(spec, q)
    ckpt = ("unsloth" if backend == "unsloth" else "hf") if grad_ckpt else "off"
    training = TrainingSettings(batch_size, seq_len, grad_accum, ckpt, optimizer, resolve_attn(spec, attn_impl or "auto"))
    q, warnings = check_gpu_dtype(q, gpu_, auto_fix=not strict_dtype)
    warnings = ck_warnings + warnings
    if isinstance(model, str) and spec_origin(model) == "user, shadows bundled":
        warnings.insert(0, f"model {model!r} is your spec in {user_spec_dir()}, which shadows the bundled one "
                           "(`qplan models` marks it)")
    if calib is not None and gpu_ is not None and calib["device"] != gpu_.name:
        raise QPlanError(f"calibration file {calibration} was fitted on {calib['device']}, not {gpu_.name}")
    dist = None
    if gpus * nodes > 1 or strategy is not None or cpu_offload:
        dist = DistSettings(gpus, nodes, strategy or "ddp", cpu_offload)
        dist.validate(q, backend)
    return PlanInputs(spec, lora, q, training, gpu_, backend, tokens, price_per_hour, calib, dist), warnings


def make_plan(**options: Any) -> dict[str, Any]:
    """The plan document (plan.json) of ``options`` (see ``plan_inputs`` for the names and defaults),
    with ``suggestions`` when it does not fit its GPU."""
    inputs, warnings = plan_inputs(**options)
    plan = build_plan(inputs, warnings)
    if plan["prediction"]["fits"] is False and inputs.dist is not None:
        plan["suggestions"] = ["`qplan fit --max-gpus N` searches the number of GPUs and the strategy"
                               + ("" if inputs.dist.cpu_offload or inputs.dist.strategy == "ddp"
                                  else "; --cpu-offload moves the sharded states to host memory")]
    elif plan["prediction"]["fits"] is False:
        from .fit import suggestions

        plan["suggestions"] = suggestions(inputs)
    return plan
