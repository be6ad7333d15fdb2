"""One backend run in its own process: ``python -m qplan.backends.worker RUN_DIR/job.json``.

``backends.runner`` writes ``job.json`` and starts this module with the backend's interpreter
(Unsloth patches transformers and PEFT on import, so no two backends share a process). It
loads the model, trains under ``MeasureCallback`` and writes ``RUN_DIR/measured.json`` — also
when the run ends in an out-of-memory error, a Ctrl-C or any other failure, with what was
measured up to then. Exit code: 0 ok, 1 error, 3 out of memory, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
EXIT = {"ok": 0, "error": 1, "oom": 3, "interrupted": 130}


def is_oom(exc: BaseException) -> bool:
    """CUDA/accelerator ``OutOfMemoryError``, or a host ``MemoryError``/"out of memory" on the CPU."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "unsloth", "trl"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def device_info(device: str) -> dict[str, Any]:
    import torch

    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        return {"type": "cuda", "name": props.name, "total_bytes": int(props.total_memory),
                "capability": f"{props.major}.{props.minor}"}
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"type": "cpu", "name": name, "threads": torch.get_num_threads()}


def resolve_device(requested: str) -> str:
    import torch

    from qplan.planner.errors import QPlanError

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise QPlanError("--device cuda was asked for but torch sees no CUDA device (use --device cpu)")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise QPlanError(f"--device must be auto, cpu or cuda[:N], got {requested!r}")
    return requested


def _instantiate(target: str) -> Any:
    from .registry import load_target

    obj = load_target(target)
    return obj() if isinstance(obj, type) else obj


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from qplan.planner.files import atomic_write
    from qplan.planner.validate import dumps_finite

    atomic_write(path, dumps_finite(data, indent=2, ensure_ascii=False) + "\n")  # a NaN loss is null, never a bare NaN


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` and return the measured.json document (also written to the run folder)."""
    from qplan.planner.errors import QPlanError

    from .base import Failure, Measurement, ModelSource, TrainSettings
    from .ranks import rank_env

    run_dir = Path(job["run_dir"])
    plan = json.loads((run_dir / job["plan"]).read_text(encoding="utf-8"))  # relative to the run folder
    t = plan["training"]
    renv = rank_env() if int(job.get("world_size") or 1) > 1 else None
    strategy = (plan.get("distributed") or {}).get("strategy")
    out_file = run_dir / "measured.json"
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "status": "running",
        "backend": job["backend"],
        "model": plan["model"]["name"],
        "run": {k: job.get(k) for k in ("model_dir", "random_init", "seed", "data", "steps", "epochs", "lr",
                                        "warmup_steps", "measure_steps")},
        "environment": versions(),
        "measured": Measurement().to_json(),
        "failure": None,
        "notes": [],
    }
    if renv is not None:
        # one file per rank (the runner merges them into measured.json); written now, so a rank that
        # is killed before it can write again is still known to have started
        out_file = run_dir / "ranks" / f"rank{renv.rank}.json"
        out_file.parent.mkdir(exist_ok=True)
        doc.update(rank=renv.rank, local_rank=renv.local_rank, world_size=renv.world, pid=os.getpid(),
                   node=renv.node, host=socket.gethostname(), last_step=None)
        _write_json(out_file, doc)
    m = Measurement()
    probe = meter = data = None
    tmp_dirs: list[str] = []
    status = "error"
    failure: Failure | None = None
    try:
        # the backend first: Unsloth must be imported before transformers and peft
        backend = _instantiate(job["target"])
        from .measure import MeasureCallback, Probe

        device = resolve_device(job.get("device") or "auto")
        if renv is not None and device.startswith("cuda"):
            device = f"cuda:{renv.local_rank}"  # one GPU per rank
        doc["run"]["device"] = device
        doc["device"] = device_info(device)
        probe = Probe(device)
        probe.full = plan.get("method") == "full"  # the trained weights are weights, not adapters
        if job.get("random_init"):
            from .modelsrc import build_random_model_dir

            probe.set_phase("random_init")
            folder = tempfile.mkdtemp(prefix="qplan-random-init-")
            tmp_dirs.append(folder)
            build_random_model_dir(plan["model"]["config"], folder, seed=int(job.get("seed") or 0))
            source = ModelSource(Path(folder), random_init=True, seed=int(job.get("seed") or 0))
        else:
            source = ModelSource(Path(job["model_dir"]))
        if renv is not None:
            from transformers import set_seed

            from .ranks import check_same_plan, init_group

            # every node must run the same plan: checked over the process group before any model loads (random
            # weights are written first: transformers saves on rank 0 only once a process group exists)
            probe.set_phase("process_group")
            init_group(device)
            check_same_plan((run_dir / job["plan"]).read_bytes(), renv.node)
            set_seed(int(job.get("seed") or 0))  # the same adapters' initialisation on every rank
        prepared = backend.prepare(plan, source, device, probe)
        m.params = dict(prepared.params)
        sharded = strategy in ("fsdp", "hsdp")  # FSDP2: on GPUs accelerate shards, on the CPU the ranks do here
        shard_here = renv is not None and sharded and not device.startswith("cuda")
        if renv is not None:
            from .ranks import shard_fsdp2, sync_trainable

            if shard_here:
                probe.set_phase("shard")
                sync_trainable(prepared.model)
                shard_fsdp2(prepared.model, plan["distributed"])
                snap = probe.snapshot("after_shard", prepared.model, adapters=True)
                # get_memory_footprint() counts DTensors at their global size: this rank's frozen shards
                # and buffers are what it holds (quantization constants apart, as get_memory_footprint)
                probe.weights_footprint = snap["model_tensors_by_category"].get("weights", 0)
        doc["notes"] += prepared.notes
        m.memory = probe.memory()

        from .data import load_dataset

        probe.set_phase("data")
        head = prepared.model.get_output_embeddings()
        vocab = int(head.weight.shape[0]) if head is not None else int(plan["model"]["config"]["vocab_size"])
        step_blocks = int(t["batch_size"]) * int(t.get("grad_accum", 1))
        if t.get("precompute_ref_log_probs"):  # the pass's first batch is as large as the plan's
            step_blocks = max(step_blocks, int(t.get("precompute_ref_batch_size") or 0))
        world = renv.world if renv is not None else 1
        # every rank draws its own blocks (the Trainer's distributed sampler): one step needs world x blocks
        if plan["prediction"].get("data"):  # a --data plan: its samples, batched as planned
            from .plan_data import load_plan_data

            data = load_plan_data(plan, prepared.tokenizer, job.get("data"), vocab, bool(job.get("largest_first")),
                                  first_measured=int(job.get("warmup_steps", 1)) * int(t.get("grad_accum", 1)))
        elif t.get("objective", "sft") in ("dpo", "reward"):  # pairs: two blocks each (backends.preference_train)
            from .preference_train import PreferencePairs

            data = PreferencePairs(load_dataset(job.get("data"), prepared.tokenizer, int(t["seq_len"]),
                                                2 * step_blocks * world, model_vocab=vocab))
        elif t.get("objective", "sft") == "grpo":  # prompts of the plan's prompt length (backends.grpo_train)
            from .grpo_train import GrpoPrompts

            g = t["grpo"]
            data = GrpoPrompts(load_dataset(job.get("data"), prepared.tokenizer, int(g["prompt_length"]),
                                            max(1, step_blocks * world // int(g["num_generations"])), model_vocab=vocab),
                               int(g["num_generations"]))
        elif t.get("objective", "sft") == "kto":  # unpaired rows, a block each (backends.preference_train)
            from .preference_train import UnpairedRows

            data = UnpairedRows(load_dataset(job.get("data"), prepared.tokenizer, int(t["seq_len"]),
                                             step_blocks * world, model_vocab=vocab), int(t["batch_size"]))
        else:
            data = load_dataset(job.get("data"), prepared.tokenizer, int(t["seq_len"]), step_blocks * world,
                                model_vocab=vocab)
        doc["run"]["data_blocks"] = len(data)
        doc["run"]["data_tokens"] = data.tokens_in_file
        doc["notes"] += data.notes
        steps = job.get("steps")
        epochs = job.get("epochs")
        total = steps if steps is not None else int(len(data) // step_blocks * float(epochs or 1.0))
        warm, meas = int(job.get("warmup_steps", 1)), int(job.get("measure_steps", 2))
        if total < warm + meas:
            raise QPlanError(f"the run has {total} optimizer steps; measuring needs at least {warm + meas} "
                             f"({warm} warm-up + {meas} measured): raise --steps or --epochs")
        probe.vocab = vocab
        from qplan.observe.tracker import LogitsRule

        # Unsloth's chunked cross-entropy makes the logits in chunks of rows
        # prompt tuning's virtual tokens make logits too (PEFT prepends them to every row)
        virtual = int((plan.get("prompt_tuning") or plan.get("p_tuning") or {}).get("num_virtual_tokens", 0))
        rows = 2 if t.get("objective", "sft") in ("dpo", "reward") else 1  # a pair: a chosen and a rejected row
        probe.logits = LogitsRule.for_step(vocab, rows * int(t["batch_size"]), int(t["seq_len"]) + virtual,
                                           chunked=job["backend"] == "unsloth")
        meter = MeasureCallback(probe, tokens_per_step=rows * step_blocks * int(t["seq_len"]), warmup_steps=warm,
                                measure_steps=meas)
        extra = [_instantiate(c) for c in job.get("callbacks") or []]
        if renv is not None:  # the step each rank reached, in its file: a node that dies is known to have reached it
            extra.insert(0, _last_step_callback(doc, out_file))
        out_dir = tempfile.mkdtemp(prefix="qplan-trainer-")
        tmp_dirs.append(out_dir)
        settings = TrainSettings(steps=steps, epochs=epochs, learning_rate=float(job.get("lr") or 2e-4),
                                 output_dir=Path(out_dir), seed=int(job.get("seed") or 0))
        backend.train(prepared, data, plan, settings, [meter, *extra])
        probe.set_phase("save")
        if renv is None and plan.get("method") == "full":  # the trained model, not an adapter
            backend.save_adapter(prepared, run_dir / "model")
        elif renv is None:
            adapter = backend.save_adapter(prepared, run_dir / "adapter")
            m.adapter_file_bytes = adapter.stat().st_size
        else:
            # FSDP2 shards the model in place (here on the CPU, by accelerate on GPUs): gather the adapters
            m.adapter_file_bytes = _save_from_ranks(backend, prepared, run_dir / "adapter", renv.saver,
                                                    sharded)
        status = "ok"
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the write below
        status = "interrupted"
        failure = _failure("interrupted", probe, meter, None)
    except QPlanError as exc:
        status = "error"
        failure = _failure("error", probe, meter, exc)
        failure.message = str(exc)
        if getattr(exc, "kind", None):
            failure.kind = exc.kind
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded, then reported
        if is_oom(exc):
            status = "oom"
            failure = _failure("oom", probe, meter, exc)
        else:
            status = "error"
            failure = _failure("error", probe, meter, exc)
            failure.traceback = traceback.format_exc()
    finally:
        if probe is not None:
            if probe.window_open:
                probe.end_window(meter.current_step if meter else 0)
            m.memory = probe.memory()
        if meter is not None:
            meter.close()
            m.loss = meter.loss
            m.timing = meter.timing()
            doc["run"]["trainer"] = meter.trainer_args
        shapes = getattr(getattr(data, "collate", None), "shapes", None)
        if shapes:  # a --data plan's batches, in the order the collator made them (the loader may run one ahead)
            from .plan_data import KEEP_SHAPES

            doc["run"]["batch_shapes"] = shapes[:KEEP_SHAPES]
            doc["run"]["largest_first"] = bool(job.get("largest_first"))
        doc["status"] = status
        doc["measured"] = m.to_json()
        doc["failure"] = asdict(failure) if failure else None
        if renv is not None:
            doc["host_memory"] = _host_memory()
        _write_json(out_file, doc)
        for d in tmp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if renv is not None and status == "ok":
            from .ranks import destroy, gather_docs

            # every node's folder gets every rank's file (the nodes may not share a disk): one report covers all
            everyone = gather_docs(doc)
            for other in everyone if renv.local_rank == 0 else []:
                if isinstance(other, dict) and other.get("rank") != renv.rank:
                    _write_json(run_dir / "ranks" / f"rank{int(other['rank'])}.json", other)
            destroy()
    return doc


def _last_step_callback(doc: dict[str, Any], out_file: Path) -> Any:
    from transformers import TrainerCallback

    class LastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            doc["last_step"] = int(state.global_step)
            _write_json(out_file, doc)

    return LastStep()


def _host_memory() -> dict[str, Any]:
    """This process's peak resident memory (``ru_maxrss``, KiB on Linux) and the host's total (/proc/meminfo)."""
    import resource

    out: dict[str, Any] = {"rss_peak": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "total": None}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                out["total"] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _save_from_ranks(backend: Any, prepared: Any, folder: Path, saver: bool, sharded: bool) -> int | None:
    """The saving rank (node 0's local rank 0) writes the adapter; a sharded model's adapters are gathered to it
    first (every rank takes part). Returns the file's size on that rank, None elsewhere."""
    from .ranks import barrier, full_trainable_state

    state = full_trainable_state(prepared.model, saver) if sharded else None
    size = None
    if saver:
        if state is not None:
            prepared.model.save_pretrained(str(folder), safe_serialization=True, state_dict=state)
            path = folder / "adapter_model.safetensors"
        else:
            path = backend.save_adapter(prepared, folder)
        size = path.stat().st_size
    barrier()
    return size


def _failure(kind: str, probe: Any, meter: Any, exc: BaseException | None) -> Any:
    from .base import Failure

    step = meter.current_step if meter is not None and meter.current_step else None
    phase = probe.phase if probe is not None else "start"
    where = f"at step {step} in phase {phase}" if step else f"in phase {phase}"
    what = {"oom": "OOM", "interrupted": "interrupted", "error": "error"}[kind]
    detail = f": {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}" if exc else ""
    return Failure(kind=kind, message=f"{what} {where}{detail}", step=step, phase=phase,
                   exception=type(exc).__name__ if exc else None, at=time.time())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m qplan.backends.worker RUN_DIR/job.json", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: models come from a folder
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    job_file = Path(args[0]).resolve()
    job = json.loads(job_file.read_text(encoding="utf-8"))
    job["run_dir"] = str(job_file.parent)  # the run folder is where its job.json is: it may have been moved
    doc = execute(job)
    return EXIT.get(doc["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
