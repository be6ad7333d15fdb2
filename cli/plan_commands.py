"""`qplan estimate` and `qplan fit`: their options are generated from ``planner.options``.

Every planning option (flag, default, help, choices) is a field of ``PlanOptions`` / ``FitOptions``;
``model_options`` turns the fields into click options, and the values go back through the same
model (``check_options`` / ``check_fit_options``: bounds and choices, one line naming the flag).
``qplan serve`` parses its queries with these very commands, and ``qplan.cli.reference`` writes
docs/options.md from them. Only the command's own input/output options are written here.
"""

from __future__ import annotations

from typing import Any

import click

from qplan.cli.common import FORMATS, emit, output_name, warn
from qplan.planner.errors import QPlanError
from qplan.planner.files import check_output_file, write_new_file
from qplan.planner.options import FitOptions, OptionInfo, PlanOptions, option_infos

_TYPES = {"int": int, "float": float, "str": str}


def click_option(o: OptionInfo) -> Any:
    """The click option of one field. Values are validated by the options model afterwards, so that
    a bad value is one line naming the flag and the choices, whichever way the option arrives."""
    decls = [o.flag, *([o.short] if o.short else []), o.name]
    if o.kind == "bool" and o.negatable:
        return click.option(f"{o.flag}/{o.negative_flag}", o.name, default=o.default, show_default=True, help=o.help)
    if o.kind == "bool":
        return click.option(*decls, is_flag=True, help=o.help)
    return click.option(*decls, type=_TYPES[o.kind], default=o.default, required=o.required,
                        metavar="[" + "|".join(o.choices) + "]" if o.choices else None,
                        show_default=o.default not in (None, ""), help=o.help)


def model_options(cls: type) -> Any:
    """A decorator adding every field of ``cls`` as a click option, in the model's order."""

    def deco(f: Any) -> Any:
        for o in reversed(option_infos(cls)):
            f = click_option(o)(f)
        return f

    return deco


def config_options(f: Any) -> Any:
    f = click.option("--config-format", type=click.Choice(["axolotl", "llamafactory", "trl"]), default=None,
                     help="the trainer the --from-config file is for [default: detected]")(f)
    return click.option("--from-config", "from_config", default=None,
                        help="an axolotl / LLaMA-Factory / TRL config (YAML or JSON): its settings, "
                             "overridden by explicit flags (a TRL DPO or KTO file: with --objective dpo or kto)")(f)


def with_trainer_config(o: dict[str, Any], names: tuple[str, ...] | None = None
                        ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``o`` (a command's options) with the values of ``--from-config`` for every option not given on the
    command line (``names``: the options the command takes from the file; all when None), and the plan's
    ``trainer_config`` section: the file, its tool and its warnings by kind (printed once the plan is made: an error
    stays one line); None without ``--from-config``."""
    from click.core import ParameterSource

    path, fmt = o.pop("from_config", None), o.pop("config_format", None)
    source = None
    if path:
        from qplan.planner.interop.trainer_configs import read_trainer_config
        from qplan.planner.options import check_options
        from qplan.planner.vocab import TRAINING_OBJECTIVES

        objective = o.get("objective") if o.get("objective") in TRAINING_OBJECTIVES else "sft"  # fit's is another
        opts, warnings, tool = read_trainer_config(path, fmt, objective)
        source = {"path": str(path), "format": tool, "warnings": warnings}
        try:
            check_options(opts)
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
        cli_data = ctx.get_parameter_source("data") == ParameterSource.COMMANDLINE
        if cli_data and "seq_len" in opts:
            # --data given here: the file's length (axolotl sequence_len, TRL max_length) is the truncation
            opts.setdefault("max_seq_len", opts.pop("seq_len"))
        if names is not None and "seq_len" not in opts and "max_seq_len" in opts and "data" not in opts and not cli_data:
            opts["seq_len"] = opts["max_seq_len"]  # qplan fit: the file's max_length fixes the length it searches at
        if names is not None and ("data" in opts or cli_data):
            names = (*names, "data", "max_seq_len", "batching", "packing_strategy")  # fit plans the file's data too
        for k, v in opts.items():
            if (names is None or k in names) and ctx.get_parameter_source(k) != ParameterSource.COMMANDLINE:
                o[k] = v
    elif fmt:
        raise QPlanError("--config-format goes with --from-config FILE")
    if not o.get("model"):
        raise QPlanError("--model is required (a bundled name, a config.json, a Hub id), or --from-config FILE")
    return o, source


def config_texts(source: dict[str, Any] | None) -> list[str]:
    """The texts of a ``trainer_config`` section's warnings (what the command line prints)."""
    return [w["text"] for w in (source or {}).get("warnings", [])]


def with_source(plan: dict[str, Any], source: dict[str, Any] | None) -> dict[str, Any]:
    """``plan`` with its ``trainer_config`` section, in the document's key order (after ``warnings``)."""
    if source is None:
        return plan
    out: dict[str, Any] = {}
    for k, v in plan.items():
        if k == "prediction":
            out["trainer_config"] = source
        out[k] = v
    return out


# ------------------------------------------------------------------------------ estimate


@click.command()
@model_options(PlanOptions)
@config_options
@click.option("--method", type=click.Choice(["analytic", "trace"]), default="analytic", show_default=True,
              help="analytic: the formulas (instant, no torch); trace: run real training steps on the meta device "
                   "under a live-tensor tracker (needs torch)")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="table: for a person; json: the plan document (plan.json) on stdout")
@click.option("--output", "-o", default=None, callback=output_name, help="write the plan to this file (plan.json)")
@click.option("--force", is_flag=True, help="replace an existing --output file")
def estimate(method: str, fmt: str, output: str | None, force: bool, **o: Any) -> None:
    """Exact LoRA parameter counts and the memory budget of a fine-tune."""
    from qplan.planner.api import make_plan
    from qplan.planner.document import dumps
    from qplan.planner.options import check_options
    from qplan.planner.render import render_plan

    if output:
        check_output_file(output, force)  # before any work: not an existing file, a folder we can write in
    o, source = with_trainer_config(o)
    plan = with_source(make_plan(check_options(o)).to_dict(), source)
    dist = plan.get("distributed")
    if method == "trace" and dist is not None and (dist["strategy"] != "fsdp" or dist["cpu_offload"]):
        raise QPlanError(f"--method trace traces one rank of --strategy fsdp without --cpu-offload; the step of "
                         f"{dist['strategy']}{' with --cpu-offload' if dist['cpu_offload'] else ''} is not traced "
                         "(see docs/multi-gpu.md)")
    # a DPO step is traced with its collator's attention mask, padded (observe.trace.dpo); a --data plan's is not
    padded = plan["training"].get("padded") and plan["training"].get("objective", "sft") == "sft"
    if method == "trace" and (padded or plan["training"].get("flat_tokens")):
        raise QPlanError("--method trace steps unpadded batch × seq_len batches: a --data plan with padded batches or "
                         "padding-free packs (a 4-D attention mask, one flattened row) is planned with --method analytic "
                         "(proven by CPU runs: docs/data.md)")
    if method == "trace":
        from qplan.planner.plan import attach_trace

        try:
            from qplan.observe.trace import trace_plan
            from qplan.observe.trace.dist import trace_rank_step
        except ImportError as exc:  # pragma: no cover - only without the train extra
            raise QPlanError("--method trace needs torch, transformers and peft: pip install 'qplan[train]'") from exc
        pre = plan["training"].get("precompute_ref_log_probs")  # the pass before training, traced on one GPU
        attach_trace(plan, trace_rank_step(plan) if dist is not None else trace_plan(plan),
                     trace_plan(plan, steps=1, precompute_pass=True) if pre else None)
    text = dumps(plan)
    if output:
        write_new_file(output, text, force)
    warn(config_texts(source))
    if fmt == "json":
        click.echo(text, nl=False)
    else:
        click.echo(render_plan(plan))
        if output:
            click.echo(f"\nplan written to {output}")


# ---------------------------------------------------------------------------------- fit

#: what `qplan fit --from-config` takes from the file (the rest is searched)
FIT_FROM_CONFIG = ("model", "r", "targets", "quant", "optimizer", "seq_len", "reentrant", "loss", "adapter_dtype",
                   "liger_kernels", "full")


@click.command()
@model_options(FitOptions)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="table: for a person; json: the search's document")
@config_options
def fit(fmt: str, **o: Any) -> None:
    """Search batch, sequence, rank, targets, checkpointing, optimizer and quant for plans that fit.
    With --from-config the file fixes the model, rank, targets, quantization, optimizer and sequence
    length (flags override); the micro-batch and checkpointing are searched. With --max-gpus: the
    fewest GPUs of the --gpu kind, and the strategy, that train the plan the other flags fix."""
    from qplan.planner.render import render_fewest_gpus, render_fit, render_rent
    from qplan.planner.search.fit import fit_document

    o, source = with_trainer_config(o, FIT_FROM_CONFIG)
    result = fit_document(o)
    warn(config_texts(source))
    if "peak_per_rank" in (result.get("best") or [{}])[0] or ("recipe" in result and o.get("max_gpus") is not None):
        text = render_rent(result)
    else:
        text = render_fewest_gpus(result) if o.get("max_gpus") is not None else render_fit(result)
    emit(fmt, result, text)


# ---------------------------------------------------------------------------------- compare


@click.command()
@model_options(PlanOptions)
@click.option("--methods", default="full,lora,qlora", show_default=True,
              help="comma-separated methods: full, lora, qlora, dora, lorafa, loha, lokr, vera, miss, c3a, ia3, "
                   "ln_tuning, "
                   "prompt_tuning, "
                   "p_tuning (each the plan estimate makes with it; prompt_tuning, p_tuning with --num-virtual-tokens; "
                   "p_tuning with --encoder-hidden-size)")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="table: for a person; json: one row per method")
def compare(methods: str, fmt: str, **o: Any) -> None:
    """Full fine-tuning, LoRA and QLoRA side by side: trainable parameters, peak, verdict, time and cost."""
    from qplan.planner.render import render_compare
    from qplan.planner.search.compare import compare_methods, parse_methods

    result = compare_methods(o, parse_methods(methods))
    emit(fmt, result, render_compare(result))

