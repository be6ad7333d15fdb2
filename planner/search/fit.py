"""`qplan fit`: search the plan space for plans that fit a GPU; suggestions for a plan that doesn't.

Every candidate goes the way of `qplan estimate`: its inputs are resolved by ``plan.plan_inputs`` from
``PlanOptions``, and its memory is the PEFT profile's (``planner.memory.profiles``). What depends only
on (r, targets, quant, optimizer, checkpointing) — LoRA counts, weights, optimizer states — is computed
once per combination, and the profile's memory model (linear forms in batch x sequence) is evaluated
in the inner loop.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Any

from qplan.planner.compute.flops import flops_form, step_bytes
from qplan.planner.compute.ops import step_launches
from qplan.planner.compute.timing import DEFAULT_EFFICIENCY, SECONDS_PER_LAUNCH, ideal_step_seconds, step_peaks
from qplan.planner.data import check_data_options, data_profile
from qplan.planner.data.batching import padded
from qplan.planner.errors import QPlanError
from qplan.planner.memory.profiles import StepContext, select_profile
from qplan.planner.memory.terms import max_context, overhead_bytes
from qplan.planner.model.catalog import gpu_catalog, load_gpu, load_spec
from qplan.planner.model.lora import trainable_params
from qplan.planner.model.weights import QuantSettings, checkpoint_quant
from qplan.planner.options import DEFAULT_QUANT, FULL_QUANT, OBJECTIVES, FitOptions, PlanOptions, as_dict, check_fit_options
from qplan.planner.plan import DEFAULT_SEQ_LEN, plan_counts, plan_inputs
from qplan.planner.plan import liger_kernels as check_liger_kernels
from qplan.planner.validate import read_calibration
from qplan.planner.vocab import ADAPTER_DTYPE_NAMES, LIGER_KERNELS, OPTIMIZERS

DEFAULT_RS = (8, 16, 32, 64)
DEFAULT_TARGETS = ("qv", "attn", "all-linear")
DEFAULT_QUANTS = ("nf4", "int8", "bf16")
DEFAULT_OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")
BATCHES = (1, 2, 4, 8, 16, 32, 64)
SEQS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
CKPTS = ("hf", "off")



def parse_prices(price: str | float | None, gpus: list) -> dict[str, float]:
    """``--price-per-hour``: one number for every GPU, or ``name=price,...`` per catalog GPU."""
    if price is None or price == "":
        return {}
    try:
        value = float(price)
        return {g.name: value for g in gpus}
    except (TypeError, ValueError):
        pass
    out = {}
    for item in str(price).split(","):
        name, _, v = item.partition("=")
        try:
            out[load_gpu(name.strip()).name] = float(v)
        except ValueError as exc:
            raise QPlanError(f"--price-per-hour: {item!r} is not NAME=PRICE") from exc
    searched = {g.name for g in gpus}
    extra = [n for n in out if n not in searched]
    if extra:
        raise QPlanError(f"--price-per-hour names {', '.join(extra)}, which --gpu does not search")
    return out


def read_prices(path: str, gpus: list) -> dict[str, float]:
    """``--prices FILE``: a JSON or YAML mapping of GPU names (or aliases) to prices per GPU-hour; the searched GPUs'
    prices (a file may price more GPUs than a search uses). Nothing is invented: a GPU it leaves out has no cost."""
    from qplan.planner.interop.config_files import read_config_file

    data = read_config_file(path, "--prices", "a price file")
    out = {}
    for name, v in data.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise QPlanError(f"--prices {path}: the price of {name!r} must be a number (per GPU-hour), got {v!r}")
        out[load_gpu(str(name)).name] = float(v)
    searched = {g.name for g in gpus}
    return {n: v for n, v in out.items() if n in searched}


def _check_prices(prices: dict[str, float]) -> dict[str, float]:
    for name, v in prices.items():
        if not (0 <= v <= 1e6):  # also refuses nan and inf
            raise QPlanError(f"--price-per-hour for {name} must be a finite number from 0 to 1,000,000, got {v}")
    return prices


def search(model: str, gpu_name: str, *, seq_len=None, batch_size=None, quant=None, r=None, targets=None,
           optimizer=None, top: int = 10, objective: str = "memory", tokens: int | None = None,
           price_per_hour: str | float | None = None, calibration: str | None = None,
           batching: str | None = None, pad_to_multiple_of: int | None = None,
           padding_free: bool = False, rows_padded: bool = False, reentrant: bool = False,
           loss: str = "full", adapter_dtype: str = "fp32", liger_kernels: str = "",
           global_batch: int | None = None, search_recipe: bool = False, prices: str | None = None,
           max_gpus: int | None = None, full: bool = False) -> dict[str, Any]:
    """Plans that fit ``gpu_name`` (a catalog name, ``a,b,c``, or ``all``), ranked by ``objective``:
    ``memory`` (most tokens per step, cheapest tricks first), ``time`` (most tokens/s) or ``cost``
    (least cost per million tokens; needs ``price_per_hour``). ``batching``, ``pad_to_multiple_of``: a ``--data``
    plan's (its padded batches' attention mask is counted); ``padding_free``: its packs are flattened into one row
    of ``batch × seq_len`` tokens (TRL's bfd; the block mask counted under SDPA/eager); ``rows_padded``: its packed
    rows carry pads (axolotl's multipack), so the mask is counted too; ``reentrant``: checkpointing, where a plan has
    it, is torch's reentrant one; ``loss``: every plan's loss (``vocab.LOSSES``); ``adapter_dtype``: every plan's LoRA
    tensors' dtype (a candidate it does not go with, e.g. bf16 adapters of a 16-bit model under fp16, is left out);
    ``liger_kernels``: every plan's Liger kernels (``--liger-kernels``); ``full``: full fine-tuning plans (``--full``:
    no rank or targets; the weights bf16 unless ``quant`` gives another 16/32-bit dtype; Adafactor searched too).

    By ``time`` or ``cost`` the trained model is kept: rank, targets, quantization, optimizer and sequence length are
    as given (else ``qplan estimate``'s defaults) and ``global_batch`` sequences per optimizer step stay; the GPU, the
    micro-batch x gradient-accumulation split and checkpointing are searched. ``search_recipe`` searches the recipe
    too, and each row says what it changed. ``prices``: a price file (``read_prices``)."""
    if objective not in OBJECTIVES:
        raise QPlanError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if not gpu_name or not str(gpu_name).strip():
        raise QPlanError("--gpu is empty: give a GPU name (see `qplan gpus`), a comma-separated list, or all")
    if not model or not str(model).strip():
        raise QPlanError("--model is empty: give a bundled name (see `qplan models`), a config.json or a model folder")
    keep = objective in ("time", "cost") and not search_recipe
    if search_recipe and objective == "memory":
        raise QPlanError("--search-recipe goes with --objective time or cost (--objective memory searches the recipe)")
    if max_gpus is not None and not keep:
        raise QPlanError("--max-gpus ranks GPU counts by --objective time or cost, without --search-recipe (with "
                         "--objective memory it finds the fewest GPUs: fit_document)")
    if global_batch is not None and not keep:
        raise QPlanError("--global-batch goes with --objective time or cost, without --search-recipe: it is the batch "
                         "those rankings keep")
    if full and (r is not None or targets is not None):
        raise QPlanError(f"{'--r' if r is not None else '--targets'} is a LoRA option: --full trains every parameter")
    if full and max_gpus is not None:
        raise QPlanError("--full is planned on one GPU for now: --max-gpus searches several")
    d = PlanOptions(model=model)  # estimate's defaults: the recipe a time/cost ranking keeps or says it changed
    given = {"r": None if full else r or d.r, "targets": "full" if full else targets or d.targets or "all-linear",
             "quant": quant or d.quant or (FULL_QUANT if full else DEFAULT_QUANT),
             "optimizer": optimizer or d.optimizer, "seq_len": seq_len or DEFAULT_SEQ_LEN,
             "batch_size": batch_size or d.batch_size}
    recipe = None
    if keep:
        r, targets, quant, optimizer, seq_len = (given[k] for k in ("r", "targets", "quant", "optimizer", "seq_len"))
        global_batch = global_batch or batch_size or 1
        if batch_size is not None and global_batch % batch_size:
            raise QPlanError(f"--batch-size {batch_size} does not divide --global-batch {global_batch}: the micro-batch "
                             "times the accumulation steps must make the global batch")
        recipe = {"r": r, "targets": targets, "quant": quant, "optimizer": optimizer, "seq_len": seq_len,
                  "global_batch": global_batch}
    gpus = list(gpu_catalog().values()) if gpu_name == "all" else [load_gpu(n.strip()) for n in gpu_name.split(",")]
    calib = read_calibration(calibration) if calibration else None
    if calib is not None and (len(gpus) != 1 or calib["device"] != gpus[0].name):
        raise QPlanError(f"calibration file {calibration} was fitted on {calib['device']}: use it with --gpu {calib['device']}")
    calibration = calib
    if prices is not None and price_per_hour is not None:
        raise QPlanError("give either --prices FILE or --price-per-hour, not both")
    prices = _check_prices(read_prices(prices, gpus) if prices is not None else parse_prices(price_per_hour, gpus))
    unpriced = [g.name for g in gpus if g.name not in prices]
    if objective == "cost":
        if len(unpriced) == len(gpus):
            raise QPlanError("--objective cost needs a price: --prices FILE, or --price-per-hour (a number or "
                             "NAME=PRICE,...); qplan invents none")
        gpus = [g for g in gpus if g.name in prices]  # a GPU without a price cannot be ranked by cost
    if max_gpus is not None:  # which GPU, and how many: whole plans per (GPU, count, strategy, split)
        from qplan.planner.search.rent import rank_gpus

        if calibration is not None or batching is not None:
            raise QPlanError("--max-gpus with --objective time/cost ranks whole plans: without --calibration and --data")
        out = rank_gpus(model=model, gpus=gpus, max_gpus=max_gpus, recipe=recipe, objective=objective, tokens=tokens,
                        prices=prices, top=top, loss=loss, adapter_dtype=adapter_dtype, liger_kernels=liger_kernels,
                        reentrant=reentrant)
        if unpriced:
            out["unpriced"] = unpriced
        return out
    runs = [_search_one(model, g, seq_len=seq_len, batch_size=batch_size, quant=quant, r=r, targets=targets,
                        optimizer=optimizer, objective=objective, tokens=tokens, price=prices.get(g.name),
                        calibration=calibration, batching=batching, pad_to_multiple_of=pad_to_multiple_of,
                        padding_free=padding_free, rows_padded=rows_padded, reentrant=reentrant, loss=loss,
                        adapter_dtype=adapter_dtype, liger_kernels=liger_kernels, global_batch=global_batch, full=full)
            for g in gpus]
    if search_recipe:  # every row says what it changed of the recipe as given, else estimate's defaults
        for res in runs:
            for row in res["rows"]:
                row["changed"] = [f"{k} {given[k]} -> {row[k]}" for k in given if row[k] != given[k]]
    if len(gpus) > 1:  # every row says which GPU it is for, and how much that GPU has
        for res, g in zip(runs, gpus):
            for row in res["rows"]:
                row.setdefault("gpu", g.name)
                row["usable_bytes"] = g.usable_bytes
    results = [row for res in runs for row in res["rows"]]
    if objective == "time":
        results.sort(key=lambda x: (-x["tokens_per_second"], x["peak"]))
    elif objective == "cost":
        results.sort(key=lambda x: (x["cost_per_million_tokens"], -x["tokens_per_second"]))
    else:
        # best: most tokens per step, then cheaper memory-saving tricks, then larger r
        pref_q = {"bf16": 0, "fp16": 0, "int8": 1, "nf4": 2}
        results.sort(key=lambda x: (-x["tokens"], x["grad_ckpt"] != "off", pref_q.get(x["quant"], 3),
                                    -(x["r"] or 0), x["headroom"] * -1))
    if keep and len(gpus) > 1:  # which GPU to rent: each GPU's best plan, the GPUs ranked
        seen: set[str] = set()
        results = [x for x in results if not (x["gpu"] in seen or seen.add(x["gpu"]))]
    first = runs[0]
    out = {
        "model": first["model"], "gpu": ",".join(g.name for g in gpus), "usable_bytes": first["usable_bytes"],
        "candidates": sum(r_["candidates"] for r_ in runs), "fitting": len(results), "best": results[:top],
    }
    if objective != "memory" or len(gpus) > 1:
        out["objective"] = objective
    if recipe is not None:
        out["recipe"] = recipe
        out["searched"] = ["gpu", "micro-batch x gradient accumulation", "checkpointing"]
    if timed_unpriced := [n for n in unpriced if objective != "memory"]:
        out["unpriced"] = timed_unpriced
    if loss != "full":
        out["loss"] = loss
    if ADAPTER_DTYPE_NAMES[adapter_dtype] != "float32":
        out["adapter_dtype"] = ADAPTER_DTYPE_NAMES[adapter_dtype]
    kernels = [k for k in LIGER_KERNELS if k in {x.strip() for x in liger_kernels.split(",")}]
    if kernels:
        out["liger_kernels"] = kernels
    if calibration is not None:
        out["calibrated"] = calibration["source"]
    return out


def _search_one(model: str, gpu: Any, *, seq_len, batch_size, quant, r, targets, optimizer, objective: str,
                tokens: int | None, price: float | None, calibration: dict | None = None,
                batching: str | None = None, pad_to_multiple_of: int | None = None,
                padding_free: bool = False, rows_padded: bool = False, reentrant: bool = False,
                loss: str = "full", adapter_dtype: str = "fp32", liger_kernels: str = "",
                global_batch: int | None = None, full: bool = False) -> dict[str, Any]:
    spec = load_spec(model)
    check_liger_kernels(liger_kernels, spec, "peft", None)  # once, in one line (not a candidate left out)
    usable = gpu.usable_bytes
    ctx = max_context(spec) or max(SEQS)
    if seq_len is not None and seq_len > ctx:
        raise QPlanError(f"--seq-len {seq_len} exceeds {spec.name}'s context of {ctx} tokens")
    for name, v in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--r", r)):
        if v is not None and v <= 0:
            raise QPlanError(f"{name} must be >= 1, got {v}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise QPlanError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    seqs = [seq_len] if seq_len else [s for s in SEQS if s <= ctx]
    if global_batch:  # (micro-batch, accumulation steps) that make the global batch
        micro = [batch_size] if batch_size else [b for b in sorted(set(BATCHES) | {global_batch})
                                                 if b <= global_batch and global_batch % b == 0]
        pairs = [(b, global_batch // b) for b in micro]
    else:
        pairs = [(b, 1) for b in ([batch_size] if batch_size else BATCHES)]
    rs = [r] if r else list(DEFAULT_RS)
    presets = spec.inventory.presets
    tgts = [targets] if targets else [t for t in DEFAULT_TARGETS if presets.get(t)]
    quants = [quant] if quant else list(DEFAULT_QUANTS)
    opts = [optimizer] if optimizer else list(DEFAULT_OPTIMIZERS)
    if full:  # every parameter trains: no rank or targets to search; a 16/32-bit base; Adafactor's factored state too
        rs, tgts, quants = [None], ["full"], [quant or FULL_QUANT]
        opts = [optimizer] if optimizer else [*DEFAULT_OPTIMIZERS, "adafactor"]
    results = []
    candidates = 0
    profile = select_profile("peft")
    for qn, rr, tg, op in itertools.product(quants, rs, tgts, opts):
        try:  # a checkpoint saved quantized loads one way only (and keeps its 16-bit modules)
            checkpoint_quant(spec, QuantSettings(qn, True, "bfloat16", True))
        except QPlanError:
            if quant:
                raise
            continue
        # every candidate's inputs are resolved as `qplan estimate` resolves them (the GPU's dtype,
        # the checkpoint's quantization, LoRA's defaults, the model's attention)
        try:
            lora_options = {"full": True} if full else {"r": rr, "targets": tg, "adapter_dtype": adapter_dtype}
            inp, _ = plan_inputs(PlanOptions(model=spec.name, quant=qn, optimizer=op, loss=loss,
                                             liger_kernels=liger_kernels, **lora_options), spec=spec, device=gpu)
        except QPlanError:
            if quant or ADAPTER_DTYPE_NAMES[adapter_dtype] == "float32":
                raise
            continue  # adapters in a dtype this candidate's compute does not go with

        q, lora = inp.quant, inp.lora
        counts = plan_counts(inp)
        for ck in (("reentrant", "off") if reentrant else CKPTS):
            ctx = StepContext.build(spec, lora, q, replace(inp.training, grad_ckpt=ck), counts, gpu, "peft")
            models = {False: profile.memory_model(ctx)}  # a --data plan's padded batches: the mask too
            if batching is not None:
                models[True] = profile.memory_model(replace(ctx, training=replace(ctx.training, padded=True)))
            attn = ctx.training.attn_impl
            timed = objective != "memory"
            eff = float(calibration["efficiency"]) if calibration else DEFAULT_EFFICIENCY
            overhead = float(calibration.get("overhead_seconds", 0.0)) if calibration else 0.0
            if timed:
                peak_fs, lora_peak, bw, reason = step_peaks(gpu.to_json(), q.quant, q.compute_dtype, lora.adapter_dtype)
                if reason is not None:
                    raise QPlanError(f"--objective {objective}: {reason}")
                fa, fc = flops_form(spec, counts, rr, q, ck, attn, loss)
                la = flops_form(spec, counts, rr, q, ck, attn, loss, term="lora")[0]
                per_acc: dict[int, tuple[dict, float]] = {}  # accumulation steps -> (bytes moved, launch seconds)
                for acc in {a for _, a in pairs}:
                    launches = step_launches(spec, counts, q, replace(ctx.training, grad_accum=acc), lora)["total"]
                    per_acc[acc] = (step_bytes(spec, counts, rr, q, ck, op, trainable_params(counts), acc),
                                    0.0 if calibration else SECONDS_PER_LAUNCH * launches)
            for (b, acc), s in itertools.product(pairs, seqs):
                candidates += 1
                if padding_free:  # one row of b packs; a block-causal mask unless flash attention runs them varlen
                    tensor_peak = models[attn != "flash_attention_2"].peak(1, b * s, acc)
                else:
                    mask = batching is not None and (padded(batching, b, pad_to_multiple_of) or rows_padded)
                    tensor_peak = models[mask].peak(b, s, acc)
                peak = tensor_peak + sum(overhead_bytes(tensor_peak, calibration).values())
                if peak <= usable:
                    tok = b * s * acc  # tokens per optimizer step
                    row = {
                        "batch_size": b, "seq_len": s, "r": rr, "targets": tg, "quant": q.quant,
                        "grad_ckpt": ck, "optimizer": op, "tokens": tok, "peak": peak,
                        "headroom": usable - peak,
                    }
                    if global_batch:
                        row.update(grad_accum=acc, global_batch=b * acc)
                    if timed:
                        moved, launch_s = per_acc[acc]
                        flops = {"total": (fa * b * s + fc * b * s * s) * acc, "lora": la * b * s * acc}
                        step = ideal_step_seconds(flops, moved, peak_fs, bw, lora_peak) / eff + launch_s + overhead
                        row.update(gpu=gpu.name, step_seconds=step, tokens_per_second=tok / step)
                        if tokens is not None:
                            row["total_seconds"] = math.ceil(tokens / tok) * step
                        if price is not None:
                            row["cost_per_million_tokens"] = price * step / 3600 / tok * 1e6
                            if tokens is not None:
                                row["total_cost"] = price * row["total_seconds"] / 3600
                    results.append(row)
    return {"model": spec.name, "usable_bytes": usable, "candidates": candidates, "rows": results}


def fit_document(options: FitOptions | dict[str, Any]) -> dict[str, Any]:
    """What ``qplan fit --format json`` prints (shared with ``qplan serve``): with ``max_gpus`` the fewest
    GPUs and strategy (``planner.search.fewest_gpus``), else the batch/sequence/rank search."""
    o = as_dict(check_fit_options(options))
    if o["max_gpus"] is not None and o["objective"] in ("time", "cost") and not o["search_recipe"] and o["data"]:
        raise QPlanError("--max-gpus with --objective time/cost ranks whole plans of a fixed shape: give --seq-len "
                         "instead of --data")
    data = _data_seq_len(o)
    max_gpus, upcast = o.pop("max_gpus"), o.pop("upcast")
    if max_gpus is not None and o["objective"] in ("time", "cost") and not o["search_recipe"]:
        if not upcast:
            raise QPlanError("--no-upcast goes with --max-gpus's fewest-GPU search (--objective memory)")
        return search(o.pop("model"), o.pop("gpu"), max_gpus=max_gpus, **o)
    if max_gpus is not None:
        from qplan.planner.search.fewest_gpus import fewest_gpus

        extra = [flag for key, flag in (("global_batch", "--global-batch"), ("search_recipe", "--search-recipe"),
                                        ("prices", "--prices")) if o.get(key)]
        if extra:
            raise QPlanError(f"{', '.join(extra)} go with the GPU ranking (--objective time or cost), not the fewest-GPU "
                             "search (--max-gpus with --objective memory)")

        fixed = {k: o[k] for k in ("seq_len", "batch_size", "quant", "r", "targets", "optimizer", "reentrant", "loss",
                                   "adapter_dtype", "liger_kernels") if o.get(k) is not None}
        return fewest_gpus(model=o["model"], gpu=o["gpu"], max_gpus=max_gpus, upcast=upcast, **fixed)
    if not upcast:
        raise QPlanError("--no-upcast goes with --max-gpus (the batch search keeps the k-bit upcast)")
    out = search(o.pop("model"), o.pop("gpu"), batching=data["batching"] if data else None,
                 pad_to_multiple_of=data["pad_to_multiple_of"] if data else None,
                 padding_free=bool(data and data["padding_free"]), rows_padded=bool(data and data["rows_padded"]), **o)
    if data is not None:
        out["data"] = data
    return out


def _data_seq_len(o: dict[str, Any]) -> dict[str, Any] | None:
    """``--data``: the sequence length the dataset's worst batch has (padding: its longest kept sample, whatever
    the batch; packing: ``--max-seq-len``) fixes ``seq_len`` (``o`` is changed); the data options are removed."""
    keys = ("data", "tokenizer", "data_format", "max_seq_len", "batching", "packing_strategy", "pad_to_multiple_of",
            "long_samples")
    d = {k: o.pop(k) for k in keys}
    if not check_data_options(d, o.get("seq_len")):
        return None
    if not o.get("model"):
        raise QPlanError("--model is required (a bundled name, a config.json, a Hub id), or --from-config FILE")
    prof = data_profile(d["data"], tokenizer=d["tokenizer"], model_source=dict(load_spec(o["model"]).source or {}),
                        fmt=d["data_format"], max_length=d["max_seq_len"], batching=d["batching"],
                        packing_strategy=d["packing_strategy"], batch_size=1,
                        pad_to_multiple_of=d["pad_to_multiple_of"], long_samples=d["long_samples"])
    o["seq_len"] = prof["worst_batch"]["seq_len"]
    return {k: prof[k] for k in ("source", "format", "samples", "truncated", "dropped", "longest_sample", "tokens",
                                 "batching", "pad_to_multiple_of")} | {
        "seq_len": o["seq_len"], "padding_free": "flat_tokens" in prof["worst_batch"],
        "rows_padded": prof["batching"] == "packing" and bool(prof["worst_batch"].get("padded"))}
