"""Human-readable tables for plans, model and GPU lists. Rendering only: no computation here."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from qplan.planner.compute.timing import DEFAULTS_SOURCE
from qplan.planner.vocab import PEFT_METHODS

GiB = 2**30
MiB = 2**20


def fmt_bytes(n: int | None) -> str:
    """Binary units, labelled as such (GiB = 2**30)."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= GiB:
        return f"{sign}{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{sign}{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{sign}{n / 1024:.1f} KiB"
    return f"{sign}{n} B"


def fmt_int(n: int) -> str:
    return f"{n:,}"


PHASE_NAMES = {"forward": "loss", "backward": "start of backward", "layers": "layer-0 backward",
               "layers_last": "last layer's backward", "mlp_forward": "MLP forward",
               "optimizer": "optimizer step", "attention": "eager attention forward",
               "unshard": "first all-gathers", "embeddings": "embeddings' backward",
               "precompute": "precompute pass (before training)"}

MEMORY_ROWS = [
    ("weights", "base weights (device, quant constants included)"),
    ("adapters", "LoRA adapters"),
    ("gradients", "gradients (trainable only)"),
    ("optimizer", "optimizer states"),
    ("activations", "activations (saved for backward)"),
    ("logits", "logits + loss (start of backward)"),
    ("temporaries", "largest transient (dequantized weight / optimizer step)"),
]


def method_text(plan: dict[str, Any], short: bool = False) -> str:
    """What trains, in words: full fine-tuning, (IA)³ on its modules, LN tuning's norms, LoHa's rank and targets,
    prompt / p-tuning's prompt, or LoRA's rank and targets."""
    lora = plan.get("lora")
    if plan.get("method") == "full":
        return "full fine-tuning" if short else "full fine-tuning (every parameter trains)"
    if plan.get("method") == "ia3":
        i3 = plan["ia3"]
        text = f"(IA)³ {','.join(i3['target_modules'])}"
        return text if short else f"{text} (feed-forward: {','.join(i3['feedforward_modules']) or 'none'})"
    if plan.get("method") == "vera":
        v = plan["vera"]
        text = f"VeRA r={v['r']} {','.join(v['target_modules'])}"
        return text if short else f"{text} (shared frozen projections, two trained vectors per module)"
    if plan.get("method") == "c3a":
        c = plan["c3a"]
        text = f"C3A block={c['block_size']} {','.join(c['target_modules'])}"
        return text if short else f"{text} (a block-circulant fp32 kernel per module, applied by FFT)"
    if plan.get("method") == "miss":
        m = plan["miss"]
        form = {True: "", False: " random init", "mini": f" mini_r={m['mini_r']}", "bat": " bat"}[m["init_weights"]]
        text = f"MiSS r={m['r']}{form} {','.join(m['target_modules'])}"
        return text if short else text + (" (the weight rebuilt from its r × r blocks every forward)" if form == " bat"
                                          else " (one block per module, added to the input's r-wide slices summed)")
    if plan.get("method") in ("loha", "lokr"):
        lh, name = plan[plan["method"]], {"loha": "LoHa", "lokr": "LoKr"}[plan["method"]]
        if short:
            return f"{name} r={lh['r']} {','.join(lh['target_modules'])}"
        factor = f" factor={lh['decompose_factor']}" if "decompose_factor" in lh else ""
        return f"{name} r={lh['r']} α={lh['alpha']:g}{factor} targets={','.join(lh['target_modules'])}"
    if plan.get("method") == "ln_tuning":
        text = f"LN tuning {','.join(plan['ln_tuning']['target_modules'])}"
        return text if short else f"{text} (a trained copy of each norm)"
    if plan.get("method") in ("prompt_tuning", "p_tuning"):
        pt = plan[plan["method"]]
        name = "prompt tuning" if plan["method"] == "prompt_tuning" else "p-tuning"
        text = f"{name} {pt['num_virtual_tokens']} virtual tokens"
        if short:
            return text
        text += f" × {pt['token_dim']} (prepended to every row)"
        if "encoder_hidden_size" in pt:
            h, H = pt["token_dim"], pt["encoder_hidden_size"]
            text += f", made by an MLP {h}→{H}→{H}→{h}"
        return text
    if short:
        return f"LoRA r={lora['r']} {lora['targets']}"
    return f"LoRA r={lora['r']} α={lora['alpha']:g} targets={lora['targets']}"


def render_plan(plan: dict[str, Any]) -> str:
    m = plan["model"]
    lora = plan["lora"]
    q = plan["quant"]
    t = plan["training"]
    p = plan["prediction"]
    mem = p["memory"]
    lines = []
    qdesc = q["quant"] + (" + double quant" if q.get("double_quant") else "")
    # 16-bit weights without mixed precision: the matmuls run in the weights' dtype (a pure 16-bit step)
    pure = q["quant"] in ("bf16", "fp16") and t.get("mixed_precision") == "no"
    compute = f"no autocast, matmuls in {q['quant']}" if pure else f"compute {q['compute_dtype']}"
    method = method_text(plan)
    lines.append(f"{m['name']} ({m['architecture']}) · {method} · {qdesc}, {compute} · backend {plan['backend']}")
    objective = t.get("objective", "sft")
    dpo = objective in ("dpo", "reward")  # pairs: a chosen and a rejected row each
    lines.append(
        ({"reward": "reward model · "}.get(objective, f"{objective.upper()} · ") if objective != "sft" else "")
        + f"batch {t['batch_size']}{' pairs (×2 rows)' if dpo else ''} × seq {t['seq_len']} (accum {t['grad_accum']}) · "
        f"grad checkpointing {t['grad_ckpt']} · {t['optimizer']} · attention {t['attn_impl']}"
        + {"cce": " · loss: Cut Cross Entropy (no logits)", "trl": " · loss: TRL's fused LM head (no logits)",
           "liger": " · loss: Liger's fused linear cross-entropy (no logits)"}.get(
            t.get("loss", "full"), "")
    )
    for w in plan.get("warnings", []):
        lines.append(f"warning: {w}")
    lines.append("")
    rows = []
    for e in p["params"]["per_module"]:
        rows.append([e["module"], e["kind"], e["shape"], e["instances"], fmt_int(e["params_per_instance"]),
                     fmt_int(e["total"]), fmt_bytes(e["bytes"])])
    lines.append(tabulate(rows, headers=["module", "kind", "in→out", "inst", "params/inst", "total", "bytes"],
                          colalign=("left", "left", "left", "right", "right", "right", "right")))
    par = p["params"]
    lines.append("")
    adapter = ("the weights are the trained model: no adapter" if plan.get("method") == "full" else
               f"adapter file {fmt_bytes(p['adapter_file_bytes'])} (safetensors, "
               f"{'float32' if lora is None else lora['adapter_dtype']})")
    lines.append(
        f"trainable {fmt_int(par['trainable'])} of {fmt_int(par['total'])} parameters "
        f"({100 * par['trainable_share']:.4f}%) · base {fmt_int(par['base'])} · {adapter}"
    )
    lines.append("")
    method = plan.get("method", "lora")
    rows = [[f"adapter tensors ({PEFT_METHODS[method][0]})" if k == "adapters" and method in PEFT_METHODS else label,
             fmt_bytes(mem[k]), fmt_int(mem[k])] for k, label in MEMORY_ROWS]
    phase = p["memory_detail"]["peak_phase"]
    rows.append(["tensor peak (live tensors, " + PHASE_NAMES.get(phase, phase) + ")",
                 fmt_bytes(mem["tensor_peak"]), fmt_int(mem["tensor_peak"])])
    rows.append(["CUDA context + allocator slack", fmt_bytes(mem["overhead"]), fmt_int(mem["overhead"])])
    rows.append(["peak (GPU must have)", fmt_bytes(mem["peak"]), fmt_int(mem["peak"])])
    tr = p.get("trace")
    if tr and "peak" in tr:  # --method trace: the traced step decides the verdict
        rows.append(["tensor peak, traced", fmt_bytes(tr["tensor_peak"]), fmt_int(tr["tensor_peak"])])
        rows.append(["peak, traced (the verdict's)", fmt_bytes(tr["peak"]), fmt_int(tr["peak"])])
    lines.append(tabulate(rows, headers=["memory", "", "bytes"], colalign=("left", "right", "right")))
    ref = p["memory_detail"].get("weights", {}).get("reference", 0)
    lines.append(
        f"weights: get_memory_footprint() would print {fmt_int(mem['weights_footprint'])} B{' for the policy' if ref else ''} "
        f"(leaves out {fmt_bytes(mem['weights'] - ref - mem['weights_footprint'])} of quantization constants)"
        + (f"; the weights include the reference model's, {fmt_bytes(ref)} (TRL loads the checkpoint again)"
           if ref else ""))
    ph = p["memory_detail"].get("phases")
    if ph:
        lines.append("tensor peak by moment: " + " · ".join(f"{PHASE_NAMES.get(k, k)} {fmt_bytes(v)}" for k, v in ph.items()))
    gen = p.get("generation")
    if gen:
        lines.append(generation_line(gen))
    paged = p["memory_detail"].get("optimizer_paged", 0)
    if paged:
        lines.append(f"optimizer: {fmt_bytes(paged)} of it is paged (CUDA unified memory, can spill to CPU)")
    host = p.get("host")
    if host is not None:
        names = {"offloaded_checkpoints": "offloaded checkpoints", "paged_optimizer": "paged optimizer",
                 "offloaded_states": "offloaded states"}
        parts = " · ".join(f"{names.get(k, k)} {fmt_bytes(v)}" for k, v in host.items() if k != "peak")
        per = " per node" if plan.get("distributed") else ""
        lines.append(f"host RAM the step keeps{per}: {fmt_bytes(host['peak'])} ({parts})")
    if p.get("data"):
        lines += data_lines(p["data"])
    lines += compute_lines(p)
    dist = plan.get("distributed")
    if dist:
        lines += distributed_lines(dist, mem)
    lines.append("")
    gpu = plan.get("gpu")
    if gpu is None:
        lines.append("no --gpu given: pass one (see `qplan gpus`) for a fit verdict")
    else:
        g = plan["training"].get("grpo") or {}
        held = g.get("vllm_reserved", 0) if g.get("vllm") == "colocate" and not g.get("vllm_sleep") else 0
        usable = fmt_bytes(gpu["usable_bytes"]) + " usable" + (f", {fmt_bytes(held)} of it vLLM's" if held else "")
        if p["fits"]:
            lines.append(f"FITS on {_cards(plan)}{gpu['name']} ({usable}): headroom {fmt_bytes(p['headroom'])}")
        else:
            lines.append(f"DOES NOT FIT on {_cards(plan)}{gpu['name']} ({usable}): "
                         f"short by {fmt_bytes(-p['headroom'])}")
            for s in plan.get("suggestions", []):
                lines.append(f"  try: {s}")
    return "\n".join(lines)


def _cards(plan: dict[str, Any]) -> str:
    d = plan.get("distributed")
    return f"{d['world_size']} × " if d else ""


def distributed_lines(d: dict[str, Any], mem: dict[str, Any]) -> list[str]:
    """What a multi-GPU plan adds: the engine, and that the memory above is one rank's."""
    r = d["per_rank"]
    out = [f"memory above is per rank: {d['world_size']} GPUs ({d['gpus_per_node']} per node × {d['nodes']}) · "
           f"{d['strategy']}: {d['engine']}" + (" · CPU offload" if d["cpu_offload"] else "")]
    single = d["single_gpu"]["weights"]
    line = f"weights per rank {fmt_bytes(mem['weights'])} (one GPU: {fmt_bytes(single)})"
    if d.get("sharding_cost") is not None:
        line += f"; sharding costs {fmt_bytes(d['sharding_cost'])} over an even split"
    if d.get("quant_storage"):
        line += (f" (4-bit weights stored as {d['quant_storage']} for FSDP: bnb_4bit_quant_storage; "
                 f"{fmt_bytes(r['quant_state_replicated'])} of quantization constants on every rank)")
    out.append(line)
    extra = {k: v for k, v in r.items() if k in ("gathered_root", "gathered_layer", "reduce_scatter", "ddp_buckets",
                                                 "reduce_bucket", "gathered")}
    if extra:
        out.append("communication / gathered: " + " · ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in extra.items()))
    if d["host_offload_per_node"]:
        out.append(f"offloaded to host memory: {fmt_bytes(d['host_offload_per_node'])} per node")
    return out


def data_lines(d: dict[str, Any], width: int = 40) -> list[str]:
    """--data: the dataset's token counts, the worst batch (the planned shape) and a length histogram with the bin
    of the longest sample marked."""
    t = d["tokens"]
    cut = f", {d['truncated']:,} truncated at {d['max_length']:,}" if d.get("truncated") else ""
    axolotl = str(d["format"]).startswith("axolotl:")
    why = ("over max length, too short, or nothing to train on" if axolotl and d.get("long_samples") == "drop"
           else "too short or nothing to train on" if axolotl else "prompt alone fills max length")
    drop = f", {d['dropped']:,} dropped ({why})" if d.get("dropped") else ""
    records = f" from {d['records']:,} records" if d.get("records", d["samples"]) != d["samples"] else ""
    out = ["", f"data {d['source']} ({d['format']}, tokenizer {d['tokenizer']}): {d['samples']:,} samples{records}"
               f"{cut}{drop}",
           f"tokens per sample: min {t['min']:,} · p50 {t['p50']:,} · p90 {t['p90']:,} · p99 {t['p99']:,} · "
           f"max {t['max']:,} (row {d['longest_sample']['row']:,})"]
    w = d["worst_batch"]
    how = (f"packing ({d['packing_strategy']}): {d['packs']:,} packs of ≤ {w['seq_len']:,} tokens"
           if d["batching"] == "packing" else f"{d['batching']}: each batch padded to its longest"
           + (f", rounded up to a multiple of {d['pad_to_multiple_of']}" if d.get("pad_to_multiple_of") else ""))
    shape = (f"{w['batch_size']} packs in one row of {w['flat_tokens']:,} tokens (padding-free)" if w.get("flat_tokens")
             else f"{w['batch_size']} × {w['seq_len']:,}")
    out.append(f"{how}; worst batch {shape} = the planned shape; per epoch "
               f"{d['padded_tokens_per_epoch']:,} tokens processed for {d['trained_tokens']:,} trained "
               f"({100 * d['efficiency']:.0f}% efficient), {d['batches_per_epoch']:,} batches")
    h = d["histogram"]
    top = max(h["counts"]) or 1
    longest = d["longest_sample"]["tokens"]
    mark = next((i for i in range(len(h["counts"])) if longest < h["edges"][i + 1]), len(h["counts"]) - 1)
    for i, c in enumerate(h["counts"]):
        bar = "█" * round(width * c / top) if c else ""
        flag = "  ← longest" if i == mark else ""
        out.append(f"  {h['edges'][i]:>7,}–{h['edges'][i + 1] - 1:<7,} {bar:<{width}} {c:>7,}{flag}")
    return out


def fmt_flops(n: float) -> str:
    for unit, k in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} FLOP"


def fmt_seconds(sec: float) -> str:
    if sec >= 86400:
        return f"{sec / 86400:.1f} days"
    if sec >= 3600:
        return f"{sec / 3600:.1f} h"
    if sec >= 60:
        return f"{sec / 60:.1f} min"
    return f"{sec:.3g} s"


def compute_lines(p: dict[str, Any]) -> list[str]:
    """FLOPs of a step, and time / cost when the plan has a device."""
    comp = p.get("compute")
    if not comp:
        return []
    f = comp["flops_per_step"]
    parts = " · ".join(f"{k.replace('_', ' ')} {100 * f[k] / f['total']:.0f}%" for k in f if k != "total" and f[k])
    lines = [f"compute per optimizer step: {fmt_flops(f['total'])} ({parts}); "
             f"{fmt_bytes(comp['bytes_per_step']['total'])} moved"]
    for what in comp.get("not_counted", []):
        lines.append(f"  not in the FLOP count: {what}")
    t = p.get("time")
    if t and t.get("step_seconds"):
        if t.get("seconds_per_launch") and t.get("kernel_launches"):
            how = (f"roofline {fmt_seconds(t['ideal_step_seconds'])} ÷ efficiency {t['efficiency']:.2f} + "
                   f"{t['kernel_launches']:,} kernel launches × {t['seconds_per_launch'] * 1e6:.0f} µs; defaults fitted "
                   f"to PEFT's L40S runs, budget ±30%")
        elif t["efficiency_source"] != DEFAULTS_SOURCE:  # a calibration file's
            how = f"roofline ÷ calibrated efficiency {t['efficiency']:.2f}"
            if t.get("overhead_seconds"):
                how += f" + {fmt_seconds(t['overhead_seconds'])}/step"
        else:
            how = f"roofline ÷ efficiency {t['efficiency']:.2f}"
            if t.get("uncertainty"):
                how += "; fitted to PEFT's L40S runs, budget ±30%"
        rate = f"{t['tokens_per_second']:,.0f} tokens/s"
        if t.get("gpus", 1) > 1:
            rate += f" in total ({t['tokens_per_second_per_gpu']:,.0f} per GPU x {t['gpus']})"
        line = f"time on {t['device']}: {fmt_seconds(t['step_seconds'])}/step, {rate} ({how})"
        if t.get("adapter_matmul_dtype"):
            line += (f"; base matmuls in {t['matmul_dtype']}, the adapters' in {t['adapter_matmul_dtype']} "
                     f"({t['adapter_peak_flops_per_second'] / 1e12:g} TFLOPS)")
        if t.get("total_seconds") is not None:
            line += f"; {t['tokens']:,} tokens = {t['steps']:,} steps = {fmt_seconds(t['total_seconds'])}"
        lines.append(line)
        c = t.get("communication")
        if c:
            lines.append(f"  communication per step: {fmt_bytes(c['bytes_per_step']['total'])} through each GPU's "
                         f"{c['link']} link, {fmt_seconds(c['seconds'])} (ring collectives at the link's peak, not "
                         "overlapped: a bound)")
            a = c.get("across_nodes")
            if a:
                lines.append(f"  across nodes: {fmt_bytes(a['bytes_per_step_per_node'])} per step through each node's "
                             f"network ({a['network_bytes_per_second_one_way'] * 8 / 1e9:g} Gbit/s one way, "
                             f"--network-gbps), {fmt_seconds(a['seconds'])} of the communication above")
        for what in t.get("not_in_time", []):
            lines.append(f"  not in the time: {what}")
    elif t:
        lines.append(f"time: not predicted ({t.get('reason')})")
    c = p.get("cost")
    if c:
        total = f"{c['total']:,.2f} for the run" if c.get("total") is not None else "give --tokens for the run's total"
        lines.append(f"cost at {c['price_per_hour']:g}/GPU-hour: {c['per_step']:.4g} per step; {total}")
    return lines


def render_models(rows: list[dict[str, Any]]) -> str:
    return tabulate(
        [[r["name"], r["origin"], r["architecture"], fmt_int(r["params"]), r["layers"], r["hidden"], r["vocab"],
          r["context"], r["source"]] for r in rows],
        headers=["model", "origin", "architecture", "params", "layers", "hidden", "vocab", "context", "source"],
    )


def render_gpus(rows: list[dict[str, Any]]) -> str:
    return tabulate(
        [[g["name"], g["full_name"], fmt_bytes(g["total_bytes"]), fmt_bytes(g["usable_bytes"]),
          "yes" if g["bf16"] else "no", g["peak_bf16_tflops"] or g["peak_fp16_tflops"],
          g.get("peak_fp32_tflops") or "-", g["memory_bandwidth_gb_s"],
          f"{g['interconnect']} {g['interconnect_gb_s']:g} GB/s" if g.get("interconnect") else "-"] for g in rows],
        headers=["gpu", "name", "total", "usable", "bf16", "16-bit TFLOPS", "fp32 TFLOPS", "GB/s", "link (both ways)"],
    )


def render_fit(result: dict[str, Any]) -> str:
    objective = result.get("objective", "memory")
    where = result["gpu"] if "," in result["gpu"] else f"{result['gpu']} ({fmt_bytes(result['usable_bytes'])} usable)"
    fit = (f"{result['fitting']} GPUs can train it" if result.get("recipe") and "," in result["gpu"]
           else f"{result['fitting']} fit")
    lines = [f"{result['model']} on {where}: {result['candidates']} plans searched, {fit}"
             + (f"; ranked by {objective}" if objective != "memory" else "")]
    d = result.get("data")
    if d:
        lines.append(f"sequence length {d['seq_len']:,} from --data {d['source']}: {d['samples']:,} samples, the longest "
                     f"{d['longest_sample']['tokens']:,} tokens (row {d['longest_sample']['row']:,})"
                     + (f", {d['truncated']:,} truncated" if d["truncated"] else "") + f"; {d['batching']}")
    rows = []
    timed = objective != "memory"
    per_gpu = timed or "," in result["gpu"]
    recipe = result.get("recipe")
    if recipe:
        method = "full fine-tuning" if recipe["targets"] == "full" else f"r={recipe['r']} targets={recipe['targets']}"
        lines.append(f"kept: {method} quant={recipe['quant']} "
                     f"optimizer={recipe['optimizer']} seq {recipe['seq_len']:,} · global batch {recipe['global_batch']} "
                     "(searched: GPU, micro-batch x accumulation, checkpointing)")
    changed = any("changed" in c for c in result["best"])
    for c in result["best"]:
        if recipe:
            row = [c["gpu"], c["batch_size"], c["grad_accum"], c["grad_ckpt"], fmt_bytes(c["peak"]),
                   fmt_bytes(c["headroom"])]
        else:
            row = ([c["gpu"]] if per_gpu else []) + [c["batch_size"], c["seq_len"], c["r"] or "-", c["targets"], c["quant"],
                                                  c["grad_ckpt"], c["optimizer"], fmt_bytes(c["peak"]),
                                                  fmt_bytes(c["headroom"])]
        if timed:
            row += [f"{c['tokens_per_second']:,.0f}"]
            row += [fmt_seconds(c["total_seconds"]) if "total_seconds" in c else "-"]
            row += [f"{c['cost_per_million_tokens']:.3g}" if "cost_per_million_tokens" in c else "-"]
            row += [f"{c['total_cost']:,.2f}" if "total_cost" in c else "-"]
        if changed:
            row += ["; ".join(c.get("changed", [])) or "nothing"]
        rows.append(row)
    if rows:
        if recipe:
            headers = ["gpu", "micro-batch", "accum", "ckpt", "peak", "headroom"]
        else:
            headers = (["gpu"] if per_gpu else []) + ["batch", "seq", "r", "targets", "quant", "ckpt", "optimizer",
                                                    "peak", "headroom"]
        if timed:
            headers += ["tokens/s", "total time", "cost / 1M tokens", "total cost"]
        if changed:
            headers += ["changed"]
        lines.append(tabulate(rows, headers=headers))
        if timed:
            lines.append("time: roofline on counted FLOPs and bytes ÷ " + (
                "the calibrated efficiency (--calibration)" if result.get("calibrated")
                else "the fitted efficiency + the host's kernel launches (defaults fitted to PEFT's L40S runs, "
                     "budget ±30%: reports/time/README.md)"))
        unpriced = result.get("unpriced") or []
        if unpriced and len(unpriced) == len(result["gpu"].split(",")):
            lines.append("no prices given (--prices FILE, --price-per-hour): time only; qplan invents no price")
        elif unpriced:
            lines.append(f"no price for {', '.join(unpriced)}: " + ("left out of the cost ranking" if objective == "cost"
                                                                   else "no cost shown") + "; qplan invents no price")
    else:
        lines.append("no plan fits: try a larger GPU, --quant nf4, or a shorter --seq-len")
    return "\n".join(lines)


def render_rent(result: dict[str, Any]) -> str:
    """``qplan fit --objective time|cost --max-gpus N``: each (GPU, count)'s best plan, ranked."""
    k = result["recipe"]
    lines = [f"{result['model']}: {result['candidates']} plans on {result['gpu']}; ranked by {result['objective']}",
             f"kept: r={k['r']} targets={k['targets']} quant={k['quant']} optimizer={k['optimizer']} seq {k['seq_len']:,} "
             f"· global batch {k['global_batch']} over all GPUs (searched: GPU, count within one node, strategy, "
             "micro-batch x accumulation, checkpointing)"]
    if not result["best"]:
        lines.append("no plan fits: try a larger GPU, more GPUs (--max-gpus) or a smaller --global-batch")
        return "\n".join(lines)
    rows = [[r["gpu"], r["gpus"], r["strategy"], r["batch_size"], r["grad_accum"], r["grad_ckpt"],
             fmt_bytes(r["peak_per_rank"]), f"{r['tokens_per_second']:,.0f}", fmt_seconds(r["communication_seconds"]),
             fmt_seconds(r["total_seconds"]) if "total_seconds" in r else "-",
             f"{r['cost_per_million_tokens']:.3g}" if "cost_per_million_tokens" in r else "-",
             f"{r['total_cost']:,.2f}" if "total_cost" in r else "-"] for r in result["best"]]
    lines.append(tabulate(rows, headers=["gpu", "gpus", "strategy", "micro-batch", "accum", "ckpt", "peak/rank",
                                         "tokens/s", "comm/step", "total time", "cost / 1M tokens", "total cost"]))
    lines.append("time: roofline ÷ the fitted efficiency + the host's kernel launches + the ranks' communication "
                 "(ring collectives at the link's peak: a bound); defaults fitted to PEFT's L40S runs, budget ±30%")
    unpriced = result.get("unpriced") or []
    if unpriced and len(unpriced) == len(result["gpu"].split(",")):
        lines.append("no prices given (--prices FILE, --price-per-hour): time only; qplan invents no price")
    elif unpriced:
        lines.append(f"no price for {', '.join(unpriced)}: qplan invents none")
    return "\n".join(lines)


def render_fewest_gpus(result: dict[str, Any]) -> str:
    """``qplan fit --max-gpus``: the plans on the fewest cards."""
    if not result["fitting"]:
        return (f"no plan fits on up to the searched number of {result['gpu']} cards "
                f"({result['candidates']} candidates): try a larger GPU, a shorter --seq-len or --quant nf4")
    rows = [[r["gpus"], r["nodes"], r["strategy"], "yes" if r["cpu_offload"] else "no", fmt_bytes(r["peak_per_rank"]),
             fmt_bytes(r["headroom"]), fmt_bytes(r["host_offload_per_node"]) if r["host_offload_per_node"] else ""]
            for r in result["fitting"]]
    head = f"fewest {result['gpu']} cards that train this plan: {result['world_size']} ({result['candidates']} plans tried)"
    return head + "\n\n" + tabulate(rows, headers=["gpus", "nodes", "strategy", "cpu offload", "peak per GPU", "headroom",
                                                   "host offload/node"])


def render_compare(result: dict[str, Any]) -> str:
    """``qplan compare``: full fine-tuning, LoRA and QLoRA side by side."""
    gpu = result.get("gpu")
    lines = [f"{result['model']}: methods side by side" + (f" on {gpu}" if gpu else " (no --gpu: no verdict, no time)")]
    rows, reasons = [], []
    for r in result["methods"]:
        if "error" in r:
            rows.append([r["method"], "-", "-", "-", "-", "not planned", "-", "-"])
            reasons.append(f"{r['method']}: {r['error']}")
            continue
        verdict = "-" if r["fits"] is None else ("fits, " if r["fits"] else "short by ") + fmt_bytes(abs(r["headroom"]))
        cost = r.get("total_cost", r.get("cost_per_step"))
        rows.append([r["method"], f"{r['quant']}, compute {r['compute_dtype']}", fmt_int(r["trainable"]),
                     fmt_bytes(r["peak"]), PHASE_NAMES.get(r["peak_phase"], r["peak_phase"]), verdict,
                     f"{r['tokens_per_second']:,.0f}" if r.get("tokens_per_second") else "-",
                     "-" if cost is None else f"{cost:,.4g}" + (" / step" if "cost_per_step" in r else "")])
    lines.append(tabulate(rows, headers=["method", "weights", "trainable", "peak", "at", "verdict", "tokens/s",
                                         "cost"]))
    lines += reasons
    lines.append("each row is the plan `qplan estimate` makes with that method (--full; LoRA on a 16/32-bit base; "
                 "QLoRA on nf4; lorafa: --optimizer lorafa; loha, lokr, vera, miss, c3a, ia3, ln_tuning, prompt_tuning, "
                 "p_tuning: --peft-type): --format json has them all")
    return "\n".join(lines)


def generation_line(gen: dict) -> str:
    """GRPO's generation batch in one line: transformers' generate (its KV cache and moments) or vLLM (derived)."""
    head = (f"{gen['sequences']} completions ({gen['prompts']} prompt(s)) x {gen['prompt_length']} prompt + "
            f"{gen['completion_length']} new tokens")
    v = gen.get("vllm")
    if not v:
        return (f"generation (transformers' generate, no grad): {head} · KV cache {fmt_bytes(gen['kv_cache'])} · beyond "
                f"the weights and states: prefill {fmt_bytes(gen['prefill'])}, last decode {fmt_bytes(gen['decode'])}, "
                f"last sampling {fmt_bytes(gen['sample'])} · tensor peak {fmt_bytes(gen['tensor_peak'])}")
    if v["mode"] == "server":
        return (f"generation (vLLM server, on its own GPUs; derived): {head} · its weights {fmt_bytes(v['weights'])}, "
                f"KV blocks for the batch {fmt_bytes(v['kv_cache_needed'])}: nothing on this GPU")
    held = "during generation only (sleep mode)" if v["sleep"] else "all run: the trainer has the rest"
    room = v["kv_and_activation_room"]
    short = " — fewer than the batch needs: vLLM runs fewer rows at once" if room < v["kv_cache_needed"] else ""
    return (f"generation (vLLM colocated; derived): {head} · vLLM holds {fmt_bytes(v['reserved'])} {held} · its "
            f"weights {fmt_bytes(v['weights'])}, room for KV blocks and activations {fmt_bytes(room)}, the batch's KV "
            f"{fmt_bytes(v['kv_cache_needed'])}{short}")
