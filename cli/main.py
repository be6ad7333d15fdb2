"""`qplan` command line. Thin: parse, call the library (``qplan.planner.api``, ``qplan.backends``),
render. Bad input -> one line, exit 2.

Nothing here imports torch at module level; `qplan estimate` on a bundled model never does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from qplan.planner import __version__
from qplan.planner.distributed import STRATEGIES
from qplan.planner.errors import QPlanError
from qplan.planner.files import check_folder, safe_exists, write_new_file
from qplan.planner.schema import MAX_BATCH, MAX_CONTEXT, MAX_RANK
from qplan.planner.vocab import ATTN_CHOICES, BACKENDS, BIAS_MODES, DTYPE_ALIASES, OPTIMIZERS, PRESETS, QUANTS

FORMATS = click.Choice(["table", "json"])
QUANT_CHOICES = list(QUANTS)


def _emit(fmt: str, data: Any, table: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        click.echo(table)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qplan")
def cli() -> None:
    """Plan the memory of a LoRA / QLoRA fine-tune before renting a GPU — then prove it."""


# ------------------------------------------------------------------------------ estimate


def plan_options(f):
    opts = [
        click.option("--model", "-m", default=None,
                     help="bundled model name (see `qplan models`), a config.json, a model directory or a Hub id ORG/NAME[@REV]"),
        click.option("--r", "r", type=int, default=16, show_default=True, help="LoRA rank"),
        click.option("--alpha", type=float, default=None, help="LoRA alpha [default: 2*r]"),
        click.option("--dropout", type=float, default=None,
                     help="LoRA dropout [default: 0.05; 0 where PEFT adapts fused MoE experts, which refuse dropout]"),
        click.option("--targets", default="all-linear", show_default=True,
                     help=f"preset {'|'.join(PRESETS)}, or comma-separated module names"),
        click.option("--bias", type=click.Choice(list(BIAS_MODES)), default="none", show_default=True),
        click.option("--dora", is_flag=True, help="DoRA: one magnitude vector per adapted module"),
        click.option("--rslora", is_flag=True, help="rank-stabilised scaling alpha/sqrt(r)"),
        click.option("--target-parameters", default="",
                     help="comma-separated parameters to adapt (PEFT's target_parameters, e.g. mlp.experts.gate_up_proj)"),
        click.option("--modules-to-save", default="", help="comma-separated modules trained in full (e.g. embed_tokens,lm_head)"),
        click.option("--quant", type=click.Choice(QUANT_CHOICES), default="nf4", show_default=True),
        click.option("--double-quant/--no-double-quant", default=True, show_default=True,
                     help="4-bit: quantize the absmax constants"),
        click.option("--compute-dtype", type=click.Choice(sorted(DTYPE_ALIASES)), default="bf16", show_default=True),
        click.option("--upcast/--no-upcast", "upcast", default=True, show_default=True,
                     help="k-bit plans: prepare_model_for_kbit_training casts unquantized params to fp32"),
        click.option("--gpu", default=None, help="target GPU (see `qplan gpus`)"),
        click.option("--seq-len", type=int, default=512, show_default=True),
        click.option("--batch-size", type=int, default=1, show_default=True),
        click.option("--grad-accum", type=int, default=1, show_default=True),
        click.option("--grad-ckpt/--no-grad-ckpt", default=True, show_default=True, help="gradient checkpointing"),
        click.option("--optimizer", default="adamw_torch", show_default=True, help="|".join(OPTIMIZERS)),
        click.option("--attn", "attn_impl", default="auto", show_default=True,
                     help=f"{'|'.join(ATTN_CHOICES)} (auto: what transformers picks for the model, e.g. eager for Gemma-2)"),
        click.option("--backend", default="peft", show_default=True, help="|".join(BACKENDS)),
        click.option("--strict-dtype", is_flag=True, help="fail instead of switching bf16 to fp16 on GPUs without bf16"),
        click.option("--tokens", type=int, default=None, help="tokens the run trains on: total time (needs --gpu)"),
        click.option("--dataset-tokens", type=int, default=None, help="tokens in the dataset (with --epochs)"),
        click.option("--epochs", type=float, default=None, help="passes over --dataset-tokens"),
        click.option("--price-per-hour", type=float, default=None, help="price of one GPU-hour: the run's cost"),
        click.option("--calibration", default=None,
                     help="a calibration file from `qplan calibrate` (fitted efficiency for the --gpu)"),
        click.option("--gpus", type=int, default=1, show_default=True, help="GPUs per node (memory is then per rank)"),
        click.option("--nodes", type=int, default=1, show_default=True, help="nodes"),
        click.option("--strategy", type=click.Choice(list(STRATEGIES)), default=None,
                     help="multi-GPU engine: ddp, fsdp (FSDP2 full shard), zero2, zero3 (DeepSpeed) [default: ddp]"),
        click.option("--cpu-offload", is_flag=True, help="FSDP parameter / ZeRO optimizer offload to host memory"),
    ]
    for o in reversed(opts):
        f = o(f)
    return config_options(f)


def config_options(f):
    f = click.option("--config-format", type=click.Choice(["axolotl", "llamafactory", "trl"]), default=None,
                     help="the trainer the --from-config file is for [default: detected]")(f)
    return click.option("--from-config", "from_config", default=None,
                        help="an axolotl / LLaMA-Factory / TRL config (YAML or JSON): its settings, "
                             "overridden by explicit flags")(f)


def with_trainer_config(o: dict[str, Any], names: tuple[str, ...] | None = None) -> tuple[dict[str, Any], list[str]]:
    """``o`` (a command's options) with the values of ``--from-config`` for every option not given on the
    command line (``names``: the options the command takes from the file; all when None), and the
    file's warnings (printed once the plan is made: an error stays one line)."""
    from click.core import ParameterSource

    path, fmt = o.pop("from_config", None), o.pop("config_format", None)
    warnings: list[str] = []
    if path:
        from qplan.planner.schema import check_options
        from qplan.planner.trainer_configs import read_trainer_config

        opts, warnings, _ = read_trainer_config(path, fmt)
        try:
            check_options({k: v for k, v in opts.items() if k != "model"})
        except QPlanError as exc:
            raise QPlanError(f"--from-config {path}: {exc}") from exc
        ctx = click.get_current_context()
        if opts.get("strategy") and names is not None:
            raise QPlanError(f"--from-config {path} asks for {opts['strategy']}: `qplan fit` plans one GPU per plan "
                             "(`qplan fit --max-gpus N` searches strategies): remove deepspeed/fsdp from the file, or "
                             "use `qplan estimate --from-config FILE --gpus N`")
        if opts.get("strategy") and ctx.get_parameter_source("gpus") != ParameterSource.COMMANDLINE:
            raise QPlanError(f"--from-config {path} asks for {opts['strategy']} (sharded over GPUs), and the number of "
                             "GPUs is the launcher's, not the file's: pass --gpus N (per node; --nodes M)")
        for k, v in opts.items():
            if (names is None or k in names) and ctx.get_parameter_source(k) != ParameterSource.COMMANDLINE:
                o[k] = v
    elif fmt:
        raise QPlanError("--config-format goes with --from-config FILE")
    if not o.get("model"):
        raise QPlanError("--model is required (a bundled name, a config.json, a Hub id), or --from-config FILE")
    return o, warnings


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        click.echo("qplan: warning: " + " ".join(w.split()), err=True)


@cli.command()
@plan_options
@click.option("--method", type=click.Choice(["analytic", "trace"]), default="analytic", show_default=True,
              help="trace: run one training step on the meta device under a live-tensor tracker (needs torch)")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("--output", "-o", default=None, help="write the plan to this file (plan.json)")
@click.option("--force", is_flag=True, help="replace an existing --output file")
def estimate(method: str, fmt: str, output: str | None, force: bool, **o: Any) -> None:
    """Exact LoRA parameter counts and the memory budget of a fine-tune."""
    from qplan.planner.api import make_plan
    from qplan.planner.plan import dumps
    from qplan.planner.render import render_plan

    if output and safe_exists(output) and not force:
        raise QPlanError(f"{output} already exists: choose another --output or pass --force to replace it")
    o, config_warnings = with_trainer_config(o)
    plan = make_plan(**o)
    dist = plan.get("distributed")
    if method == "trace" and dist is not None and (dist["strategy"] != "fsdp" or dist["cpu_offload"]):
        raise QPlanError(f"--method trace traces one rank of --strategy fsdp without --cpu-offload; the step of "
                         f"{dist['strategy']}{' with --cpu-offload' if dist['cpu_offload'] else ''} is not traced "
                         "(see README, \"Several GPUs\")")
    if method == "trace":
        from qplan.planner.plan import attach_trace

        try:
            from qplan.observe.trace import trace_plan
            from qplan.observe.trace.dist import trace_rank_step
        except ImportError as exc:  # pragma: no cover - only without the train extra
            raise QPlanError("--method trace needs torch, transformers and peft: pip install 'qplan[train]'") from exc
        attach_trace(plan, trace_rank_step(plan) if dist is not None else trace_plan(plan))
    text = dumps(plan)
    if output:
        write_new_file(output, text, force)
    _warn(config_warnings)
    if fmt == "json":
        click.echo(text, nl=False)
    else:
        click.echo(render_plan(plan))
        if output:
            click.echo(f"\nplan written to {output}")


# ---------------------------------------------------------------------------------- fit


@cli.command()
@click.option("--model", "-m", default=None, help="as for estimate (or from --from-config)")
@click.option("--gpu", required=True, help="a catalog GPU, a comma-separated list, or all")
@click.option("--seq-len", type=click.IntRange(1, MAX_CONTEXT), default=None, help="fix the sequence length (else search it)")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=None, help="fix the batch size (else search it)")
@click.option("--quant", type=click.Choice(QUANT_CHOICES), default=None,
              help="fix the quantization (else search nf4, int8, bf16)")
@click.option("--r", "r", type=click.IntRange(1, MAX_RANK), default=None, help="fix the rank (else search 8, 16, 32, 64)")
@click.option("--targets", default=None, help="fix the targets (else search qv, attn, all-linear)")
@click.option("--optimizer", default=None, help="fix the optimizer (else search adamw_torch, adamw_8bit, paged_adamw_8bit)")
@click.option("--top", type=click.IntRange(1, 100_000), default=10, show_default=True, help="how many plans to list")
@click.option("--objective", type=click.Choice(["memory", "time", "cost"]), default="memory", show_default=True,
              help="rank by tokens per step (memory), tokens/s (time) or cost per million tokens (cost)")
@click.option("--tokens", type=click.IntRange(1, 10 ** 15), default=None, help="tokens the run trains on: total time/cost")
@click.option("--price-per-hour", default=None, help="price of a GPU-hour: a number, or NAME=PRICE,... per GPU")
@click.option("--calibration", default=None, help="a calibration file from `qplan calibrate` for the --gpu")
@click.option("--max-gpus", type=click.IntRange(1, 4096), default=None,
              help="search the fewest GPUs (1..N) and the strategy (ddp, zero2, fsdp, zero3, offload) that fit")
@click.option("--upcast/--no-upcast", "upcast", default=True, show_default=True,
              help="with --max-gpus: k-bit plans' fp32 upcast of unquantized params")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@config_options
def fit(fmt, max_gpus, upcast, **o) -> None:
    """Search batch, sequence, rank, targets, checkpointing, optimizer and quant for plans that fit.
    With --from-config the file fixes the model, rank, targets, quantization, optimizer and sequence
    length (flags override); the micro-batch and checkpointing are searched. With --max-gpus: the
    fewest GPUs of the --gpu kind, and the strategy, that train the plan the other flags fix."""
    from qplan.planner.render import render_fewest_gpus, render_fit

    o, config_warnings = with_trainer_config(o, FIT_FROM_CONFIG)
    result = fit_document({**o, "max_gpus": max_gpus, "upcast": upcast})
    _warn(config_warnings)
    _emit(fmt, result, render_fewest_gpus(result) if max_gpus is not None else render_fit(result))


def fit_document(o: dict[str, Any]) -> dict[str, Any]:
    """What ``qplan fit --format json`` prints for its options ``o`` (shared with ``qplan serve``):
    with ``max_gpus`` the fewest GPUs and strategy, else the batch/sequence/rank search."""
    from qplan.planner.fit import search

    o = dict(o)
    max_gpus, upcast = o.pop("max_gpus", None), o.pop("upcast", True)
    if max_gpus is not None:
        from qplan.planner.fit_dist import fewest_gpus

        fixed = {k: o[k] for k in ("seq_len", "batch_size", "quant", "r", "targets", "optimizer") if o.get(k) is not None}
        return fewest_gpus(model=o["model"], gpu=o["gpu"], max_gpus=max_gpus, upcast=upcast, **fixed)
    if not upcast:
        raise QPlanError("--no-upcast goes with --max-gpus (the batch search keeps the k-bit upcast)")
    return search(o.pop("model"), o.pop("gpu"), **o)


#: what `qplan fit --from-config` takes from the file (the rest is searched)
FIT_FROM_CONFIG = ("model", "r", "targets", "quant", "optimizer", "seq_len")


# ------------------------------------------------------------------------------- export


@cli.command()
@click.argument("plan_file", type=click.Path())
@click.option("--to", "to", type=click.Choice(["axolotl", "llamafactory", "trl"]), required=True)
@click.option("--output", "-o", default=None, help="write the config to this file (else print it)")
@click.option("--force", is_flag=True, help="replace an existing --output file")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="table: the YAML; json: the config as JSON")
def export(plan_file, to, output, force, fmt) -> None:
    """Write PLAN_FILE (plan.json) as an axolotl, LLaMA-Factory or TRL config (YAML)."""
    from qplan.planner.export import export_config
    from qplan.planner.schema import check_plan, read_json

    if output and safe_exists(output) and not force:
        raise QPlanError(f"{output} already exists: choose another --output or pass --force to replace it")
    plan = check_plan(read_json(plan_file, "plan"), where=str(plan_file))
    cfg, text = export_config(plan, to, source=Path(plan_file).name)
    if output:
        write_new_file(output, text, force)
    if fmt == "json":
        click.echo(json.dumps(cfg, indent=2, ensure_ascii=False))
    elif output:
        click.echo(f"{to} config written to {output}")
    else:
        click.echo(text, nl=False)


# -------------------------------------------------------------------------------- serve


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (127.0.0.1: this machine only)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
def serve(host, port) -> None:
    """A local web calculator: the page at /, and /api/estimate, /api/fit (the plan documents of the CLI)."""
    from qplan.cli.serve import make_server

    server = make_server(host, port)
    h, p = server.server_address[:2]
    click.echo(f"qplan serve: http://{h}:{p}/ (Ctrl-C stops it)", err=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


# ------------------------------------------------------------------------------ catalogs


@cli.command()
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def models(fmt: str) -> None:
    """List the model specs qplan knows (bundled and added with `qplan spec add`)."""
    from qplan.planner.memory import max_context
    from qplan.planner.render import render_models
    from qplan.planner.specs import load_spec, model_names, spec_origin

    rows = []
    for name in model_names():
        try:
            s = load_spec(name)
        except QPlanError as exc:  # a broken user spec: say so, list the others
            click.echo("qplan: warning: skipped " + " ".join(str(exc).split()), err=True)
            continue
        c, inv = s.config, s.inventory
        rows.append({
            "name": name,
            "origin": spec_origin(name),
            "architecture": inv.architecture,
            "params": inv.total_params,
            "layers": inv.num_hidden_layers,
            "hidden": c.get("hidden_size") or c.get("n_embd"),
            "vocab": c.get("vocab_size"),
            "context": max_context(s),
            "source": s.source.get("hub_id") or s.source.get("path", ""),
        })
    _emit(fmt, rows, render_models(rows))


@cli.command()
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def gpus(fmt: str) -> None:
    """List the GPU catalog (memory in bytes, bf16 support, peak TFLOPS, bandwidth)."""
    from qplan.planner.render import render_gpus
    from qplan.planner.specs import gpu_catalog

    rows = [g.to_json() for g in gpu_catalog().values()]
    _emit(fmt, rows, render_gpus(rows))


@cli.command()
@click.argument("run_dirs", nargs=-1, type=click.Path())
@click.option("--gpu", required=True, help="the device the runs ran on: a catalog GPU or a device file (.json)")
@click.option("--output", "-o", default=None,
              help="calibration file to write [default: ~/.config/qplan/calibration/<device>.json]")
@click.option("--force", is_flag=True, help="replace an existing calibration file")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def calibrate(run_dirs, gpu, output, force, fmt) -> None:
    """Fit the step-time efficiency of a device from measured run folders (`qplan run`)."""
    from qplan.planner.calibrate import calibrate as fit_runs
    from qplan.planner.calibrate import calibration_file, holdout_error
    from qplan.planner.specs import load_gpu

    device = load_gpu(gpu)
    result = fit_runs(list(run_dirs), device.to_json())
    for line in result["skipped"]:
        click.echo("qplan: warning: skipped " + " ".join(line.split()), err=True)
    if output is None:
        base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "qplan" / "calibration"
        check_folder(base, "calibration folder", create=True)
        output = str(base / f"{device.name}.json")
    doc = calibration_file(result, "qplan calibrate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "qplan calibrate")
    doc["holdout"] = holdout_error(result)
    write_new_file(output, json.dumps(doc, indent=2) + "\n", force)
    h = doc["holdout"]
    text = (f"{device.name}: efficiency {doc['efficiency']:.3f}, overhead {doc['overhead_seconds']:.3g} s/step, "
            f"from {doc['runs']} run(s) "
            f"(per run {doc['spread']['min']:.3f} .. {doc['spread']['max']:.3f})"
            + (f"; leave-one-out step-time error median {100 * h['median_abs_error']:.1f}%, "
               f"worst {100 * h['worst_abs_error']:.1f}%" if h else "")
            + f"\nwritten to {output}: use it with `qplan estimate --gpu {gpu} --calibration {output}`")
    _emit(fmt, {**doc, "output": output}, text)


@cli.group()
def spec() -> None:
    """Create model specs from Hugging Face configs."""


@spec.command("add")
@click.argument("config", type=click.Path())
@click.option("--name", default=None, help="spec name [default: the directory or file name]")
@click.option("--hub-id", default=None, help="record the Hugging Face Hub id the config came from")
@click.option("--revision", default=None, help="record the Hub revision the config came from")
@click.option("--output-dir", default=None,
              help="where to write the spec [default: $QPLAN_SPEC_DIR or ~/.config/qplan/model_specs]")
@click.option("--force", is_flag=True, help="replace an existing spec of that name")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def spec_add(config, name, hub_id, revision, output_dir, force, fmt) -> None:
    """Build a spec (module inventory read on the meta device) from CONFIG.json, a MODEL_DIR or a Hub id
    (ORG/NAME[@REVISION]: only its config.json is fetched)."""
    from qplan.planner.hub import fetch_config, parse_hub_id
    from qplan.planner.specs import (
        bundled_model_names,
        bundled_spec_dir,
        check_spec_name,
        make_spec,
        read_config,
        user_spec_dir,
    )

    p = Path(config)
    hub = None if safe_exists(p) or config.endswith(".json") else parse_hub_id(config)
    if hub is None and not safe_exists(p):
        raise QPlanError(f"no such file or directory: {config}")
    if name is None:
        if hub:
            name = hub[0].split("/", 1)[1]
        else:
            name = p.resolve().name if p.is_dir() else (p.resolve().parent.name if p.name == "config.json" else p.stem)
    check_spec_name(name)
    out_dir = check_folder(output_dir, "--output-dir") if output_dir else user_spec_dir()
    bundled_dir = Path(str(bundled_spec_dir())).resolve()
    if name in bundled_model_names() and not force and out_dir.resolve() != bundled_dir:
        raise QPlanError(f"{name!r} is a bundled spec: a user spec of that name would replace it for every "
                         "command; choose another --name (or pass --force to shadow it on purpose)")
    source: dict[str, Any] = {}
    if hub:
        if hub_id or revision:
            raise QPlanError("--hub-id/--revision describe a local config; a Hub id names them itself (ORG/NAME@REVISION)")
        cfg, commit = fetch_config(*hub)
        source.update(hub_id=hub[0], revision=commit, config_file="config.json")
    else:
        cfg = read_config(p)
        if hub_id:
            source["hub_id"] = hub_id
        source["revision"] = revision
        source["config_file"] = p.name if p.is_file() else "config.json"
    s = make_spec(cfg, name, source)
    check_folder(out_dir, "--output-dir", create=True)
    path = write_new_file(out_dir / f"{name}.json", json.dumps(s.to_json(), indent=2, ensure_ascii=False) + "\n", force)
    inv = s.inventory
    summary = {"name": name, "path": str(path), "architecture": inv.architecture,
               "params": inv.total_params, "linear_modules": len(inv.linear)}
    _emit(fmt, summary, f"wrote {path}: {inv.architecture}, {inv.total_params:,} parameters, "
                        f"{len(inv.linear)} linear module groups")


# ------------------------------------------------------------------------ run / report


@cli.command()
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def backends(fmt: str) -> None:
    """List trainer backends (entry points `qplan.backends`) and whether each is installed."""
    from tabulate import tabulate

    from qplan.backends.registry import list_backends

    rows = list_backends()
    _emit(fmt, rows, tabulate([[b["name"], b["target"], "yes" if b["installed"] else f"no ({b['hint']})"] for b in rows],
                              headers=["backend", "entry point", "installed"]))


@cli.command()
@click.argument("plan_file", type=click.Path())
@click.option("--model-dir", default=None, help="a local model directory with weights (a real fine-tune)")
@click.option("--random-init", is_flag=True, help="build the model from its spec with random weights")
@click.option("--data", default=None, help="JSONL with 'text' or 'instruction'/'response' [default: bundled sample]")
@click.option("--steps", type=int, default=None, help="optimizer steps to run (default 4 if no --epochs)")
@click.option("--epochs", type=float, default=None)
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="learning rate (does not change memory)")
@click.option("--out-dir", default="reports/runs", show_default=True, help="a new run folder is made under it")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def run(plan_file, model_dir, random_init, data, steps, epochs, device, lr, out_dir, fmt) -> None:
    """Train PLAN_FILE for real with its backend, measure, and write a report folder."""
    from qplan.backends.runner import run_plan

    result = run_plan(plan_file, model_dir=model_dir, random_init=random_init, data=data, steps=steps,
                      epochs=epochs, device=device, out_dir=out_dir, lr=lr)
    _emit(fmt, result, result.get("summary", ""))
    if result.get("status") not in (None, "ok"):
        sys.exit(1)


@cli.command()
@click.argument("run_dirs", nargs=-1, type=click.Path())
@click.option("--output", "-o", default=None,
              help="a name ending in .html, .md or .json: that one file; any other name: a new folder with "
                   "summary.html, summary.md, summary.json and scatter.svg (default: a new folder reports/summary-<time>); "
                   "never over an existing file or folder")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def report(run_dirs, output, fmt) -> None:
    """Summarise run folders: predicted vs measured scatter, error per term, worst first."""
    from qplan.backends.summary import summarize

    result = summarize(list(run_dirs), output)
    for line in result.get("skipped", []):
        click.echo("qplan: warning: " + " ".join(line.split()), err=True)
    _emit(fmt, result, result.get("summary", ""))


# --------------------------------------------------------------------------------- main


def error_line(exc: QPlanError | click.ClickException) -> str:
    """The one line the CLI prints for a bad input (``qplan serve`` answers the same line)."""
    if isinstance(exc, QPlanError):
        return "qplan: error: " + " ".join(str(exc).split())
    msg = exc.format_message().replace("\n", " ")
    ctx = getattr(exc, "ctx", None)
    where = f" ({ctx.command_path})" if ctx is not None else ""
    return f"qplan: error{where}: {msg}"


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="qplan", standalone_mode=False)
    except QPlanError as exc:
        click.echo(error_line(exc), err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("qplan: aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(error_line(exc), err=True)
        return exc.exit_code or 2
    except KeyboardInterrupt:
        click.echo("qplan: interrupted", err=True)
        return 130
    except Exception as exc:
        if os.environ.get("QPLAN_DEBUG"):
            raise
        msg = " ".join(str(exc).split())
        click.echo(f"qplan: internal error: {type(exc).__name__}: {msg} (set QPLAN_DEBUG=1 for a traceback)", err=True)
        return 3
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
