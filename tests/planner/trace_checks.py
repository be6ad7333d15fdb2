"""The check the method tests share: a plan against its traced step, every phase and the peak's composition."""

from __future__ import annotations

#: the planner's moments inside the traced backward phase
BACKWARD = ("backward", "layers", "layers_last", "embeddings", "attention")


def assert_plan_is_the_trace(plan: dict, traced: dict, tol: float = 0.001) -> None:
    """The trainable count equal; the tensor peak and each phase's peak (forward, backward, optimizer step) within
    ``tol`` of the trace's; each category of the peak moment within ``2 tol`` of the trace's peak."""
    mem, phases = plan["prediction"]["memory"], plan["prediction"]["memory_detail"]["phases"]
    assert traced["trainable_params"] == plan["prediction"]["params"]["trainable"]
    assert abs(mem["tensor_peak"] - traced["tensor_peak"]) <= tol * traced["tensor_peak"], (mem, traced)
    tp = traced["phase_peaks"]
    for ours, theirs in ((phases["forward"], tp["forward"]), (phases["optimizer"], tp["optimizer"]),
                         (max(v for k, v in phases.items() if k in BACKWARD), tp["backward"])):
        assert abs(ours - theirs) <= tol * theirs, (phases, tp)
    detail = plan["prediction"]["memory_detail"]
    comp = detail["composition"][detail["peak_phase"]]
    for cat, b in traced["breakdown_at_peak"].items():
        assert abs(comp.get(cat, 0) - b) <= 2 * tol * traced["tensor_peak"], (cat, comp, traced["breakdown_at_peak"])
