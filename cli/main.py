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

from qplan.cli.common import FORMATS, emit, error_line, output_name, printable
from qplan.cli.plan_commands import compare, estimate, fit
from qplan.planner import __version__
from qplan.planner.errors import QPlanError
from qplan.planner.files import check_folder, check_output_file, safe_exists, write_new_file


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qplan")
def cli() -> None:
    """Plan the memory of a LoRA / QLoRA fine-tune before renting a GPU — then prove it."""


# ------------------------------------------------------------------- estimate and fit

cli.add_command(estimate)
cli.add_command(fit)
cli.add_command(compare)


# ------------------------------------------------------------------------------- export


@cli.command()
@click.argument("plan_file", type=click.Path())
@click.option("--to", "to", type=click.Choice(["axolotl", "llamafactory", "trl"]), required=True)
@click.option("--output", "-o", default=None, callback=output_name, help="write the config to this file (else print it)")
@click.option("--force", is_flag=True, help="replace an existing --output file")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="table: the YAML; json: the config as JSON")
def export(plan_file, to, output, force, fmt) -> None:
    """Write PLAN_FILE (plan.json) as an axolotl, LLaMA-Factory or TRL config (YAML)."""
    from qplan.planner.document import check_plan
    from qplan.planner.interop.export import export_config
    from qplan.planner.validate import read_json

    if output:
        check_output_file(output, force)
    from qplan.planner.api import check_consistent

    plan = check_plan(read_json(plan_file, "plan"), where=str(plan_file))
    check_consistent(plan)  # a hand-edited plan whose settings contradict its prediction is not exported
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
    from qplan.planner.memory.terms import max_context
    from qplan.planner.model.catalog import load_spec, model_names, spec_origin
    from qplan.planner.render import render_models

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
    emit(fmt, rows, render_models(rows))


@cli.command()
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def gpus(fmt: str) -> None:
    """List the GPU catalog (memory in bytes, bf16 support, peak TFLOPS, bandwidth)."""
    from qplan.planner.model.catalog import gpu_catalog
    from qplan.planner.render import render_gpus

    rows = [g.to_json() for g in gpu_catalog().values()]
    emit(fmt, rows, render_gpus(rows))


@cli.command()
@click.argument("run_dirs", nargs=-1, type=click.Path())
@click.option("--gpu", required=True, help="the device the runs ran on: a catalog GPU or a device file (.json)")
@click.option("--output", "-o", default=None, callback=output_name,
              help="calibration file to write [default: ~/.config/qplan/calibration/<device>.json]")
@click.option("--force", is_flag=True, help="replace an existing calibration file")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def calibrate(run_dirs, gpu, output, force, fmt) -> None:
    """Fit the step-time efficiency of a device from measured run folders (`qplan run`)."""
    from qplan.planner.compute.calibrate import calibrate as fit_runs
    from qplan.planner.compute.calibrate import calibration_file, holdout_error
    from qplan.planner.model.catalog import load_gpu

    device = load_gpu(gpu)
    if output is None:
        base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "qplan" / "calibration"
        check_folder(base, "calibration folder", create=True)
        output = str(base / f"{device.name}.json")
    check_output_file(output, force)  # before the runs are read
    result = fit_runs(list(run_dirs), device.to_json())
    for line in result["skipped"]:
        click.echo("qplan: warning: skipped " + " ".join(line.split()), err=True)
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
    emit(fmt, {**doc, "output": output}, text)


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
    from qplan.planner.model.catalog import (
        bundled_model_names,
        bundled_spec_dir,
        check_spec_name,
        make_spec,
        read_config,
        user_spec_dir,
    )
    from qplan.planner.model.hub import fetch_config, parse_hub_id

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
    check_folder(out_dir, "--output-dir", create=True)
    check_output_file(out_dir / f"{name}.json", force, "--output-dir", rename="--name")  # before the spec is built
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
    path = write_new_file(out_dir / f"{name}.json", json.dumps(s.to_json(), indent=2, ensure_ascii=False) + "\n", force)
    inv = s.inventory
    summary = {"name": name, "path": str(path), "architecture": inv.architecture,
               "params": inv.total_params, "linear_modules": len(inv.linear)}
    emit(fmt, summary, f"wrote {path}: {inv.architecture}, {inv.total_params:,} parameters, "
                        f"{len(inv.linear)} linear module groups")


# ------------------------------------------------------------------------ run / report


@cli.command()
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def backends(fmt: str) -> None:
    """List trainer backends (entry points `qplan.backends`) and whether each is installed."""
    from tabulate import tabulate

    from qplan.backends.registry import list_backends

    rows = list_backends()
    emit(fmt, rows, tabulate([[b["name"], b["target"], "yes" if b["installed"] else f"no ({b['hint']})"] for b in rows],
                              headers=["backend", "entry point", "installed"]))


@cli.command()
@click.argument("plan_file", type=click.Path())
@click.option("--model-dir", default=None, help="a local model directory with weights (a real fine-tune)")
@click.option("--random-init", is_flag=True, help="build the model from its spec with random weights")
@click.option("--data", default=None, help="JSONL with 'text' or 'instruction'/'response' [default: the plan's "
              "--data, else the bundled sample]")
@click.option("--steps", type=int, default=None, help="optimizer steps to run (default 4 if no --epochs)")
@click.option("--epochs", type=float, default=None)
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="learning rate (does not change memory)")
@click.option("--out-dir", default="reports/runs", show_default=True, help="a new run folder is made under it")
@click.option("--largest-first", is_flag=True,
              help="a --data plan: train the batch holding the longest sample first (an OOM comes at step 1)")
@click.option("--node-rank", type=int, default=None,
              help="a plan of several nodes: run node N on this machine (each machine runs one node; without it, "
                   "--device cpu runs every node on this host)")
@click.option("--master-addr", default=None, help="with --node-rank: node 0's address, the same on every node "
              "(node 0 hosts torchrun's c10d rendezvous)")
@click.option("--master-port", type=int, default=None, help="the rendezvous port [default: 29500; every node on "
              "this host: a free one]")
@click.option("--join-timeout", type=int, default=None,
              help="seconds a node waits for node 0 and the others to join [default: 600]")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def run(plan_file, model_dir, random_init, data, steps, epochs, device, lr, out_dir, largest_first, node_rank,
        master_addr, master_port, join_timeout, fmt) -> None:
    """Train PLAN_FILE for real with its backend, measure, and write a report folder."""
    from qplan.backends.runner import run_plan

    result = run_plan(plan_file, model_dir=model_dir, random_init=random_init, data=data, steps=steps,
                      epochs=epochs, device=device, out_dir=out_dir, lr=lr, largest_first=largest_first,
                      node_rank=node_rank, master_addr=master_addr, master_port=master_port,
                      join_timeout=join_timeout)
    emit(fmt, result, result.get("summary", ""))
    if result.get("status") not in (None, "ok"):
        sys.exit(1)


@cli.command()
@click.argument("run_dirs", nargs=-1, type=click.Path())
@click.option("--output", "-o", default=None, callback=output_name,
              help="a name ending in .html, .md or .json: that one file; any other name: a new folder with "
                   "summary.html, summary.md, summary.json and scatter.svg (default: a new folder reports/summary-<time>); "
                   "never over an existing file or folder")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
def report(run_dirs, output, fmt) -> None:
    """Summarise run folders: predicted vs measured scatter, error per term, worst first."""
    from qplan.backends.runs_summary import summarize

    result = summarize(list(run_dirs), output)
    for line in result.get("skipped", []):
        click.echo("qplan: warning: " + " ".join(line.split()), err=True)
    emit(fmt, result, result.get("summary", ""))


# --------------------------------------------------------------------------------- main


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
        msg = printable(str(exc))[:500]
        click.echo(f"qplan: internal error: {type(exc).__name__}: {msg} (set QPLAN_DEBUG=1 for a traceback)", err=True)
        return 3
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
