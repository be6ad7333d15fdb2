"""The multi-GPU settings of a trainer config (``deepspeed``, ``fsdp``, ``fsdp_config``, ``fsdp_version``)
as qplan's ``strategy`` and ``cpu_offload`` (``--strategy zero2|zero3|fsdp``, ``--cpu-offload``).

How each tool reads them (the versions of ``tests/fixtures/trainer_keys``; transformers' ``TrainingArguments``
for TRL and LLaMA-Factory):

* ``deepspeed``: a DeepSpeed JSON (a relative path is opened from the working directory, as
  transformers' ``HfTrainerDeepSpeedConfig`` and axolotl open it, else beside the config file; transformers also
  takes the dict inline).  ``zero_optimization.stage`` 2 -> zero2, 3 -> zero3; ``offload_optimizer`` /
  ``offload_param`` ``device: cpu`` -> cpu_offload (qplan's ZeRO-2 offload is the optimizer's, its ZeRO-3
  offload is both: ZeRO-3 with only one of them is refused).
* ``fsdp`` (transformers: a string or list of ``full_shard``, ``shard_grad_op``, ``hybrid_shard``,
  ``no_shard``, ``offload``, ``auto_wrap``) with ``fsdp_config`` (keys with or without the ``fsdp_``
  prefix, as transformers and axolotl strip it): FSDP2 (``version: 2``) full shard, wrapped per decoder
  layer (``auto_wrap`` / ``TRANSFORMER_BASED_WRAP``) -> fsdp; ``offload`` / ``offload_params`` -> cpu_offload.
  axolotl turns FSDP on with ``fsdp_config`` (and ``fsdp_version``) alone; transformers needs ``fsdp``.

What qplan cannot plan exactly is an error naming the key (ZeRO-0/1, NVMe offload, FSDP1, SHARD_GRAD_OP,
hybrid shard, size-based wrapping, a ZeRO-2 reduce bucket other than DeepSpeed's default, ...); keys that
change nothing qplan plans are accepted; others are listed in a warning.  The number of GPUs is the
launcher's, never in these files: ``--gpus N`` gives it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError, shown
from qplan.planner.files import read_limited
from qplan.planner.interop.notes import note

MAX_DS_BYTES = 1 << 20
#: DeepSpeed's default ``reduce_bucket_size`` (qplan's ZeRO-2 bucket term; runtime/zero/config.py)
DS_REDUCE_BUCKET = 500_000_000
#: DeepSpeed top-level keys that change nothing qplan plans per GPU (filled by transformers when "auto")
DS_NO_EFFECT = {"train_batch_size", "gradient_clipping", "steps_per_print", "wall_clock_breakdown", "scheduler",
                "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "prescale_gradients", "tensorboard",
                "wandb", "csv_monitor", "comms_logger", "flops_profiler", "dump_state", "gradient_predivide_factor"}
#: ``zero_optimization`` keys with no memory term in qplan's ZeRO plans (communication, checkpoint saving)
ZERO_NO_EFFECT = {"allgather_partitions", "allgather_bucket_size", "reduce_scatter", "round_robin_gradients",
                  "stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save", "load_from_fp32_weights",
                  "elastic_checkpoint", "ignore_unused_parameters", "use_multi_rank_bucket_allreduce"}
#: ZeRO-3 buffers that qplan's zero3 plan (DeepSpeed's ``estimate_zero3_model_states_mem_needs``) does not
#: model at any value: accepted, and named in a warning
ZERO3_UNMODELLED = {"reduce_bucket_size", "overlap_comm", "contiguous_gradients", "sub_group_size",
                    "stage3_prefetch_bucket_size", "prefetch_bucket_size", "stage3_param_persistence_threshold",
                    "param_persistence_threshold", "stage3_max_live_parameters", "max_live_parameters",
                    "stage3_max_reuse_distance", "max_reuse_distance", "stage3_model_persistence_threshold"}
#: ``fsdp_config`` keys (``fsdp_`` prefix stripped) that change nothing qplan plans per GPU
FSDP_NO_EFFECT = {"state_dict_type", "final_state_dict_type", "cpu_ram_efficient_loading", "sync_module_states",
                  "use_orig_params", "transformer_layer_cls_to_wrap", "backward_prefetch", "forward_prefetch",
                  "limit_all_gathers", "xla", "xla_fsdp_settings", "xla_fsdp_grad_ckpt"}
FSDP_OPTIONS = {"full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload", "auto_wrap"}


def _off(section: Any, key: str) -> bool:
    """``offload_optimizer`` / ``offload_param``: on for ``device: cpu``, off when absent or ``none``."""
    if section is None:
        return False
    if not isinstance(section, dict):
        raise QPlanError(f"deepspeed config: zero_optimization.{key} must be a mapping, got {shown(section)}")
    dev = section.get("device", "none")
    if dev in (None, "none"):
        return False
    if dev == "cpu":
        return True
    raise QPlanError(f"deepspeed config: zero_optimization.{key}.device {shown(dev)}: qplan plans offload to the CPU "
                     "(device: cpu) or none")


def read_deepspeed(value: Any, base: Path, fmt: str) -> tuple[dict[str, Any], str]:
    """``(the DeepSpeed config, its path for messages)`` of a ``deepspeed`` value: a JSON path — relative to the
    working directory, where the tools open it (axolotl's examples name ``deepspeed_configs/zero2.json`` of the
    folder they are run from), else to ``base`` (the trainer config's folder) — or a mapping given inline."""
    if isinstance(value, dict):
        return value, "(inline)"
    if not isinstance(value, str) or not value.strip():
        raise QPlanError(f"{fmt} config: deepspeed must be the path of a DeepSpeed JSON (or a mapping), got {shown(value)}")
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = next((c for c in (Path.cwd() / p, base / p) if c.is_file()), base / p)
    try:
        raw = read_limited(p, "DeepSpeed config", MAX_DS_BYTES)
    except QPlanError as exc:
        raise QPlanError(f"{fmt} config: deepspeed {shown(value)}: {exc}") from exc
    try:
        ds = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        why = " ".join(str(exc).split())[:200]
        raise QPlanError(f"{fmt} config: deepspeed {shown(value)}: {p} is not a DeepSpeed JSON: {why}") from exc
    if not isinstance(ds, dict):
        raise QPlanError(f"{fmt} config: deepspeed {shown(value)}: {p} is not a JSON object (a DeepSpeed config is)")
    return ds, str(p)


def deepspeed_options(value: Any, base: Path, fmt: str, micro_batch: int, grad_accum: int, precision: str
                      ) -> tuple[dict[str, Any], list[str]]:
    """``({"strategy", "cpu_offload"}, warnings)`` of a trainer config's ``deepspeed`` value."""
    ds, where = read_deepspeed(value, base, fmt)

    def bad(key: str, why: str) -> QPlanError:
        return QPlanError(f"{fmt} config: deepspeed {where}: {key}: {why}")

    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise bad("zero_optimization", f"must be a mapping, got {shown(zero)}")
    stage = zero.get("stage", 0)
    if stage not in (2, 3) or isinstance(stage, bool):
        raise bad("zero_optimization.stage", f"{shown(stage)}: qplan plans ZeRO stages 2 and 3 (stage 0/1 keep more on each "
                                             "GPU than it models: use 2, or plan DDP without deepspeed)")
    opt_off, par_off = _off(zero.get("offload_optimizer"), "offload_optimizer"), _off(zero.get("offload_param"), "offload_param")
    if stage == 2 and par_off:
        raise bad("zero_optimization.offload_param", "parameter offload is ZeRO-3's (DeepSpeed ignores it at stage 2)")
    if stage == 3 and opt_off != par_off:
        raise bad("zero_optimization.offload_" + ("param" if opt_off else "optimizer"),
                  "qplan plans ZeRO-3 offload of the optimizer and the parameters together: set both device: cpu or none")
    if stage == 2:
        defaults = {"reduce_bucket_size": DS_REDUCE_BUCKET, "overlap_comm": False, "contiguous_gradients": True}
        for k, d in defaults.items():
            v = zero.get(k, d)
            if v != d or isinstance(v, bool) != isinstance(d, bool):
                raise bad(f"zero_optimization.{k}", f"{shown(v)} changes ZeRO-2's gradient reduction buffers, which qplan plans "
                                                   f"at DeepSpeed's default ({json.dumps(d)}; 'auto' is hidden_size² in "
                                                   "transformers): set it to that or remove it")
    known = {"stage", "offload_optimizer", "offload_param", "cpu_offload"} | ZERO_NO_EFFECT | ZERO3_UNMODELLED
    if zero.get("cpu_offload"):  # DeepSpeed's deprecated spelling of offload_optimizer: cpu
        raise bad("zero_optimization.cpu_offload", "is deprecated: use offload_optimizer: {device: cpu}")
    for key, default in (("train_micro_batch_size_per_gpu", micro_batch), ("gradient_accumulation_steps", grad_accum)):
        v = ds.get(key, "auto")
        if v != "auto" and v != default:
            raise bad(key, f"{shown(v)} disagrees with the trainer config's {default} (transformers refuses the mismatch)")
    for key, on in (("bf16", "bf16"), ("fp16", "fp16")):
        sec = ds.get(key) or {}
        enabled = sec.get("enabled", False) if isinstance(sec, dict) else sec
        if enabled not in ("auto", False, None) and precision != on:
            raise bad(f"{key}.enabled", f"{shown(enabled)} disagrees with the trainer config's {precision} training")
    opt = ds.get("optimizer")
    if opt is not None and (not isinstance(opt, dict) or str(opt.get("type", "")).lower() not in ("adam", "adamw")):
        raise bad("optimizer", f"{shown(opt)}: qplan's ZeRO plans hold Adam's fp32 states (type Adam or AdamW, or leave the "
                               "optimizer to the trainer)")
    warnings = []
    if stage == 3 and (unmod := sorted(set(zero) & ZERO3_UNMODELLED)):
        warnings.append(note("approximated", f"{fmt} config: deepspeed {where}: ZeRO-3 buffers the plan does not model "
                             "(it holds DeepSpeed's estimate_zero3 working set, 4 × the largest layer): "
                             f"{', '.join(unmod)}"))
    unknown = sorted(set(zero) - known) + sorted(set(ds) - DS_NO_EFFECT - {"zero_optimization", "bf16", "fp16", "optimizer",
                                                                          "train_micro_batch_size_per_gpu",
                                                                          "gradient_accumulation_steps"})
    if unknown:
        warnings.append(note("ignored", f"{fmt} config: deepspeed {where}: keys qplan does not plan (ignored): "
                             f"{', '.join(unknown)}"))
    return {"strategy": "zero2" if stage == 2 else "zero3", "cpu_offload": opt_off}, warnings


def _fsdp_list(value: Any, fmt: str) -> list[str]:
    if isinstance(value, bool):
        return ["full_shard", "auto_wrap"] if value else []
    if isinstance(value, str):
        items = value.split()
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [w for v in value for w in v.split()]
    else:
        raise QPlanError(f"{fmt} config: fsdp must be a string or list of {', '.join(sorted(FSDP_OPTIONS))}, got {shown(value)}")
    for w in items:
        if w not in FSDP_OPTIONS:
            raise QPlanError(f"{fmt} config: fsdp {shown(w)} is not an FSDP option ({', '.join(sorted(FSDP_OPTIONS))})")
    return items


def fsdp_options(fmt: str, fsdp: Any, fsdp_config: Any, fsdp_version: Any, grad_ckpt: bool
                 ) -> tuple[dict[str, Any], list[str]] | None:
    """``({"strategy": "fsdp", "cpu_offload"}, warnings)`` of a config's FSDP keys; None when FSDP is off."""
    cfg = fsdp_config or {}
    if not isinstance(cfg, dict):
        raise QPlanError(f"{fmt} config: fsdp_config must be a mapping, got {shown(cfg)}")
    odd = [k for k in cfg if not isinstance(k, str)]
    if odd:
        raise QPlanError(f"{fmt} config: fsdp_config has a key that is not a name: {shown(odd[0])}")
    cfg = {k.removeprefix("fsdp_"): v for k, v in cfg.items()}  # transformers and axolotl strip the prefix
    items = _fsdp_list(fsdp, fmt) if fsdp not in (None, "", []) else []
    if not items and not (fmt == "axolotl" and (cfg or fsdp_version)):
        if cfg or fsdp_version:
            return {}, [f"{fmt} config: fsdp_config / fsdp_version without fsdp: transformers does not turn FSDP on "
                        "(the plan has no FSDP)"]
        return None
    version = fsdp_version if fsdp_version is not None else cfg.get("version", 1)
    if str(version) != "2":
        raise QPlanError(f"{fmt} config: fsdp_version {shown(version)}: qplan plans FSDP2 (fully_shard): set fsdp_version: 2")
    for w in ("shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard"):
        if w in items:
            raise QPlanError(f"{fmt} config: fsdp {shown(w)}: qplan plans FSDP2 full shard (full_shard)")
    if fmt != "axolotl" and "full_shard" not in items:
        raise QPlanError(f"{fmt} config: fsdp {shown(fsdp)} has no full_shard: qplan plans FSDP2 full shard")
    strategy = str(cfg.get("sharding_strategy", "FULL_SHARD")).upper()
    if strategy not in ("FULL_SHARD", "1"):
        raise QPlanError(f"{fmt} config: fsdp_config.sharding_strategy {shown(cfg['sharding_strategy'])}: qplan plans FULL_SHARD")
    if cfg.get("reshard_after_forward", True) is not True:
        raise QPlanError(f"{fmt} config: fsdp_config.reshard_after_forward {shown(cfg['reshard_after_forward'])}: qplan plans "
                         "FSDP2's default (true: free each layer's gathered parameters after its forward)")
    policy = cfg.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP" if "auto_wrap" in items or fmt == "axolotl" else None)
    if policy != "TRANSFORMER_BASED_WRAP" or cfg.get("min_num_params", 0):
        raise QPlanError(f"{fmt} config: fsdp_config.auto_wrap_policy {shown(policy)}: qplan plans one FSDP unit per decoder "
                         "layer (auto_wrap / TRANSFORMER_BASED_WRAP, no min_num_params)")
    if cfg.get("activation_checkpointing"):
        raise QPlanError(f"{fmt} config: fsdp_config.activation_checkpointing is not planned: use gradient_checkpointing "
                         "(the Trainer's checkpointing of each decoder layer"
                         f"{'' if grad_ckpt else ', which this config leaves off'})")
    offload = "offload" in items or cfg.get("offload_params", False) is True
    known = {"version", "sharding_strategy", "reshard_after_forward", "auto_wrap_policy", "min_num_params",
             "activation_checkpointing", "offload_params"} | FSDP_NO_EFFECT
    unknown = sorted(set(cfg) - known)
    warnings = [note("ignored", f"{fmt} config: fsdp_config keys qplan does not plan (ignored): {', '.join(unknown)}")] \
        if unknown else []
    return {"strategy": "fsdp", "cpu_offload": offload}, warnings
