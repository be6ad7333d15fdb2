"""Suggestions for a plan that does not fit its GPU: single changes, each checked by re-planning."""

from __future__ import annotations

from dataclasses import replace

from qplan.planner.errors import QPlanError
from qplan.planner.model.weights import QuantSettings
from qplan.planner.plan import PlanInputs, build_plan, check_gpu_dtype


def grpo_tries(inp: PlanInputs) -> list[tuple[str, PlanInputs]]:
    """GRPO's own single changes: vLLM's sleep mode when colocated; fewer micro-batches per generation batch (still a
    multiple of ``num_generations``); a shorter completion."""
    t = inp.training
    g = t.grpo
    assert g is not None
    out = []
    if g.vllm == "colocate" and not g.vllm_sleep:
        out.append(("--vllm-sleep (vLLM releases its share during the step)",
                    replace(inp, training=replace(t, grpo=replace(g, vllm_sleep=True)))))
    for spg in range(g.steps_per_generation - 1, 0, -1):
        if t.batch_size * spg % g.num_generations == 0:
            out.append((f"--steps-per-generation {spg} (a smaller generation batch)",
                        replace(inp, training=replace(t, grpo=replace(g, steps_per_generation=spg)))))
            break
    c = g.max_completion_length // 2
    if c >= 64:
        out.append((f"--max-completion-length {c}", replace(inp, training=replace(
            t, seq_len=g.prompt_length + c, grpo=replace(g, max_completion_length=c)))))
    return out


def suggestions(inp: PlanInputs, limit: int = 4) -> list[str]:
    """Single changes that make a non-fitting plan fit, cheapest first, each checked by re-planning."""
    t, q = inp.training, inp.quant
    tries: list[tuple[str, PlanInputs]] = []
    if t.grad_ckpt == "off":
        tries.append(("--grad-ckpt", replace(inp, training=replace(t, grad_ckpt="hf"))))
    if t.objective in ("dpo", "kto") and not t.precompute_ref_log_probs and inp.data is None:  # no reference forward
        tries.append(("--precompute-ref-log-probs (the reference scored in a pass before training)",
                      replace(inp, training=replace(t, precompute_ref_log_probs=True))))
    if t.precompute_ref_log_probs and t.precompute_ref_batch_size > t.batch_size:  # the pass's batches as training's
        tries.append((f"--precompute-ref-batch-size {t.batch_size} (the pass before training in smaller batches)",
                      replace(inp, training=replace(t, precompute_ref_batch_size=0))))
    if t.optimizer in ("adamw_torch", "paged_adamw_32bit"):
        tries.append(("--optimizer paged_adamw_8bit", replace(inp, training=replace(t, optimizer="paged_adamw_8bit"))))
    if q.quant not in ("nf4", "fp4"):
        tries.append(("--quant nf4", replace(inp, quant=QuantSettings("nf4", True, q.compute_dtype, True))))
    b = t.batch_size
    g = t.grpo
    while b > 1:
        b //= 2
        accum = t.grad_accum * (t.batch_size // b)
        if g is None:
            tries.append((f"--batch-size {b} --grad-accum {accum} (same tokens per optimizer step)",
                          replace(inp, training=replace(t, batch_size=b, grad_accum=accum))))
        else:  # GRPO: the same generation batch, generated every steps_per_generation micro-batches
            spg = g.steps_per_generation * (t.batch_size // b)
            tries.append((f"--batch-size {b} --grad-accum {accum} --steps-per-generation {spg} (the same generation "
                          "batch and tokens per optimizer step)",
                          replace(inp, training=replace(t, batch_size=b, grad_accum=accum,
                                                        grpo=replace(g, steps_per_generation=spg)))))
    if g is not None:
        tries += grpo_tries(inp)
    s = t.seq_len
    while s > 256 and g is None:
        s //= 2
        tries.append((f"--seq-len {s}", replace(inp, training=replace(t, seq_len=s))))
    out = []
    for label, alt in tries:
        try:
            alt_q, _ = check_gpu_dtype(alt.quant, alt.gpu, auto_fix=True)
            p = build_plan(replace(alt, quant=alt_q))
        except QPlanError:
            continue
        if p.prediction.fits:
            out.append(f"{label}: peak {p.prediction.memory.peak / 2**30:.2f} GiB")
            if len(out) >= limit:
                break
    if not out:
        out.append("no single change fits: try a larger GPU (`qplan fit` searches combinations)")
    return out
