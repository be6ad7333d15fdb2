"""Predicted vs measured: which numbers are compared, and the signed error of each.

``error[term] = (predicted - measured) / measured`` — positive: the plan over-predicts.

| term | predicted (plan.json) | measured (measured.json ``measured``) |
|---|---|---|
| ``tensor_peak`` | CUDA ``memory.tensor_peak``; CPU ``memory_detail.tensor_peak_cpu`` (*) | see (*) |
| ``peak`` | ``prediction.memory.peak`` | CUDA only: ``memory.peak_reserved + memory.cuda_context`` |
| ``weights`` | ``prediction.memory.weights`` | ``memory.weights`` (after k-bit preparation) |
| ``weights_footprint`` | ``prediction.memory.weights_footprint`` | ``get_memory_footprint()`` there |
| ``trainable`` | ``prediction.params.trainable`` | PEFT ``get_nb_trainable_parameters()[0]`` |
| ``adapter_file_bytes`` | ``prediction.adapter_file_bytes`` | size of adapter_model.safetensors |
| ``precompute_tensor_peak`` | ``memory_detail.phases[_cpu].precompute`` | ``memory.passes.precompute`` (**) |

(*) ``prediction.memory_detail.tensor_peak_cpu``: the same model with CPU kernels (fp32 dropout
noise, single-tensor AdamW); measured: ``memory.tensor_peak`` on the CPU, ``memory.peak_allocated``
on CUDA.

(**) a DPO/KTO plan with ``precompute_ref_log_probs``: the pass before training is measured apart (``Probe.measured_pass``),
and ``tensor_peak`` is then the steps' moments only.

A term that was not measured (a CPU run has no ``peak``; a failed run may have no peak at all)
has error ``None``. ``components`` pairs the plan's memory terms with the tracker's categories
at the measured peak (CPU), for the report's chart.
"""

from __future__ import annotations

from typing import Any

TERMS = ("tensor_peak", "peak", "weights", "weights_footprint", "trainable", "adapter_file_bytes", "step_seconds",
         "precompute_tensor_peak")  # the last only for a plan with the precompute_ref_log_probs pass

#: plan memory term -> tracker categories at the peak that hold the same bytes: the tracker and
#: the plan speak one vocabulary (``qplan.planner.vocab.CATEGORIES``), so each term is its category
COMPONENTS: dict[str, tuple[str, ...]] = {
    term: (term,) for term in ("weights", "adapters", "gradients", "optimizer", "activations", "logits", "temporaries")
}


def signed_error(predicted: int | float | None, measured: int | float | None) -> float | None:
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured


def pairs(plan: dict[str, Any], doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``term -> {predicted, measured, measured_as, error}`` for every term in ``TERMS``."""
    pred = plan["prediction"]
    pm = pred["memory"]
    meas = doc.get("measured") or {}
    mem = meas.get("memory") or {}
    cuda = str(mem.get("device", "")).startswith("cuda")
    detail = pred.get("memory_detail", {})
    # the steps' peak: a precompute_ref_log_probs pass before training is measured apart (its own row)
    moments = detail.get("phases") if cuda else detail.get("phases_cpu")
    moments = dict(moments) if isinstance(moments, dict) else {}  # an old or hand-made plan may lack them
    pre = moments.pop("precompute", None)
    step_peak = max(moments.values()) if pre is not None and moments else None
    passes = (mem.get("passes") or {}).get("precompute") or {}
    rows: dict[str, tuple[Any, Any, str]] = {
        "tensor_peak": (step_peak if step_peak is not None else pm["tensor_peak"] if cuda
                        else detail.get("tensor_peak_cpu", pm["tensor_peak"]),
                        mem.get("peak_allocated") if cuda else mem.get("tensor_peak"),
                        "torch.cuda.max_memory_allocated" if cuda
                        else "live tensor storages (tracker peak), vs the plan's CPU-kernel prediction"),
        "peak": (pm["peak"], mem.get("peak") if cuda else None,
                 "max_memory_reserved + CUDA context" if cuda else "not measurable on the CPU"),
        # the policy's weights: a DPO/KTO reference model (full fine-tuning) is loaded later, by the trainer
        "weights": (pm["weights"] - pred.get("memory_detail", {}).get("weights", {}).get("reference", 0),
                    mem.get("weights"),
                    "memory_allocated after load + k-bit preparation" if cuda
                    else "model tensor storages after load + k-bit preparation"),
        "weights_footprint": (pm["weights_footprint"], mem.get("weights_footprint"), "model.get_memory_footprint()"),
        "trainable": (pred["params"]["trainable"], (meas.get("params") or {}).get("trainable"),
                      "PeftModel.get_nb_trainable_parameters()"),
        "adapter_file_bytes": (pred.get("adapter_file_bytes"), meas.get("adapter_file_bytes"),
                               "size of adapter_model.safetensors"),
        "step_seconds": (_planned_step(pred, cuda), (meas.get("timing") or {}).get("mean_step_seconds"),
                         "mean step time after the warm-up (untracked steps), vs the plan's roofline for its device"),
    }
    if pre is not None:  # a plan with the precompute_ref_log_probs pass
        rows["precompute_tensor_peak"] = (pre, passes.get("peak_allocated" if cuda else "tensor_peak"),
                                          "the precompute_ref_log_probs pass before training (in the trainer's "
                                          "construction), measured as the steps are")
    return {k: {"predicted": p, "measured": m, "measured_as": how, "error": signed_error(p, m)}
            for k, (p, m, how) in rows.items()}


def _planned_step(pred: dict[str, Any], cuda: bool) -> float | None:
    """The plan's step time, when it was planned for the kind of device the run used (a CPU
    device file for a CPU run; a GPU for a CUDA run)."""
    t = pred.get("time")
    if not isinstance(t, dict) or not isinstance(t.get("step_seconds"), (int, float)):
        return None
    planned_for_gpu = t.get("device_kind", "gpu") == "gpu"
    return t["step_seconds"] if planned_for_gpu == cuda else None


def errors(plan: dict[str, Any], doc: dict[str, Any]) -> dict[str, float | None]:
    """The ``error`` section of measured.json."""
    return {k: v["error"] for k, v in pairs(plan, doc).items()}


def components(plan: dict[str, Any], doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Predicted memory terms beside the tracker's bytes of the same kind at the measured peak."""
    pm = plan["prediction"]["memory"]
    at_peak = ((doc.get("measured") or {}).get("memory") or {}).get("breakdown_at_peak")
    out = []
    for term, cats in COMPONENTS.items():
        measured = sum(at_peak.get(c, 0) for c in cats) if at_peak else None
        out.append({"term": term, "predicted": pm.get(term), "measured_at_peak": measured,
                    "categories": list(cats)})
    return out


def composition_at_peak(plan: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """The bytes at the measured peak, predicted for the same moment with the same kernels.

    * ``moment``: the plan's moment in the phase where the peak was measured
      (``planner.memory.phases.moment_in_phase``; a CUDA run has no phase: the plan's own peak moment);
    * ``predicted``: that moment's composition (``memory_detail.composition_cpu`` for a CPU run,
      ``composition`` for CUDA), in the tracker's categories; ``None`` for a plan made before
      plans held compositions;
    * ``measured``: ``breakdown_at_peak`` less ``optimizer_paged`` (outside the peak); ``None``
      on CUDA, where only the allocator's total is known;
    * ``compared``: the two totals of the ``tensor_peak`` comparison (``pairs``): the measured
      parts always add up to ``compared.measured``; the predicted parts add up to
      ``compared.predicted`` when the plan predicts its peak at that same moment, and otherwise
      ``predicted_peak`` (the composition of the plan's own peak moment) does.
    """
    from qplan.planner.memory.phases import moment_in_phase
    from qplan.planner.vocab import MOMENT_NAMES

    detail = plan["prediction"].get("memory_detail") or {}
    mem = (doc.get("measured") or {}).get("memory") or {}
    cuda = str(mem.get("device", "")).startswith("cuda")
    sfx = "" if cuda else "_cpu"
    # memory_detail is free-form in the plan schema (a user may edit plan.json): what is not
    # {name: int} / {moment: {category: int}} is treated as absent, as in a plan made before them
    phases = _ints(detail.get("phases" + sfx)) or {}
    raw = detail.get("composition" + sfx)
    comps = {k: v for k, v in raw.items() if _ints(v) is not None} if isinstance(raw, dict) else None
    peak_moment = detail.get("peak_phase" + sfx) or (max(phases, key=phases.get) if phases else None)
    phase = None if cuda else mem.get("tensor_peak_phase")
    moment = moment_in_phase(phases, phase) if phase else peak_moment
    bd = mem.get("breakdown_at_peak") or {}
    measured = {k: int(v) for k, v in bd.items() if k != "optimizer_paged"} if bd and not cuda else None
    tp = pairs(plan, doc)["tensor_peak"]
    out: dict[str, Any] = {
        "kernels": "cuda" if cuda else "cpu",
        "phase": phase, "step": mem.get("tensor_peak_step"),
        "moment": moment, "moment_name": MOMENT_NAMES.get(moment or "", moment),
        "predicted": dict(comps[moment]) if comps and moment in comps else None,
        "measured": measured,
        "compared": {"predicted": tp["predicted"], "measured": tp["measured"]},
        "predicted_peak_moment": peak_moment,
        "predicted_peak_moment_name": MOMENT_NAMES.get(peak_moment or "", peak_moment),
        "predicted_peak": dict(comps[peak_moment]) if comps and peak_moment in comps and peak_moment != moment
        else None,
        "predicted_phase_peaks": phase_predictions(phases),
    }
    return out


def phase_predictions(phases: dict[str, int]) -> dict[str, int]:
    """Predicted peak of each phase an observer marks (the largest of the plan's moments in it)."""
    from qplan.planner.vocab import MOMENTS_OF_PHASE

    out = {}
    for phase, moments in MOMENTS_OF_PHASE.items():
        vals = [phases[m] for m in moments if m in phases]
        if vals:
            out[phase] = max(vals)
    return out


def _ints(x: Any) -> dict[str, int] | None:
    if isinstance(x, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in x.values()):
        return x
    return None
