"""The live-tensor tracker is the CPU oracle: check it against byte counts worked out by hand."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qplan.observe.existing import census, register_model  # noqa: E402
from qplan.observe.summary import Curve  # noqa: E402
from qplan.observe.tracker import LiveTensorTracker, LogitsRule  # noqa: E402

"""The tracker the measurement and the trace share: byte counts worked out by hand."""


def test_counts_new_storages_once_and_follows_frees():
    tr = LiveTensorTracker("cpu")
    with tr:
        tr.set_phase("forward", 1)
        a = torch.zeros(1000)  # 4000 B
        b = a * 2  # 4000 B
        v = b.view(10, 100)  # a view: no new storage
        del b
        assert tr.live_bytes == 8000
        del v  # last reference to b's storage
        assert tr.live_bytes == 4000
        c = torch.ones(250, dtype=torch.float64)  # 2000 B
    tr.detach()
    res = Curve(tr).summarize()
    assert res["tensor_peak"] == 8000
    assert tr.live_bytes == 6000
    # made in the forward: alive at its end (a) -> activations; freed inside it (b) -> temporaries
    assert res["breakdown_at_peak"]["activations"] == 4000
    assert res["breakdown_at_peak"]["temporaries"] == 4000
    del a, c


def test_timeline_keeps_every_peak_and_the_phases():
    tr = LiveTensorTracker("cpu")
    keep = []
    with tr:
        tr.set_phase("forward", 2)
        for _ in range(30):  # 30 allocations of 400 B, kept: 12,000 B
            keep.append(torch.zeros(100))
        tr.set_phase("backward", 2)
        x = torch.zeros(1000)  # +4,000 B: the peak, 16,000 B
        del x
        keep.clear()  # 30 frees
        tr.set_phase("optimizer", 2)
        y = torch.zeros(10)
    tr.detach()
    curve = Curve(tr)
    res = curve.summarize()
    first = next(ev for ev, ph, _ in tr.marks if ph == "forward")
    full = curve.timeline(first)
    assert full["events"] == tr.event - first == 30 + 2 + 30 + 1
    assert full["bucket_events"] == 1 and full["hi"] == full["lo"] and len(full["t"]) == full["events"]
    assert full["start_bytes"] == 0 and full["hi"][29] == 12_000 and full["hi"][30] == 16_000
    assert full["peak"] == {"event": 30, "bytes": res["tensor_peak"]} and res["tensor_peak"] == 16_000
    assert [p[2] for p in full["phases"]] == ["forward", "backward", "optimizer"]
    assert full["phases"][0][:2] == [0, 30] and full["phases"][-1][1] == full["events"]
    small = curve.timeline(first, buckets=7)  # downsampled: an envelope, the peak survives
    assert len(small["t"]) == 7 and small["bucket_events"] == 9  # 63 events / 7
    assert max(small["hi"]) == 16_000 and min(small["lo"]) == min(full["lo"])
    assert small["peak"] == full["peak"]
    del y


def test_existing_tensors_categories_and_logits():
    w = torch.zeros(64, 32)  # 8192 B
    tr = LiveTensorTracker("cpu", logits=LogitsRule(16))  # any number of rows (chunked loss)
    assert tr.add_existing(w, "frozen") is not None
    assert tr.lookup(w[:10]) is tr.lookup(w)  # same storage, counted once
    with tr:
        tr.set_phase("forward", 1)
        h = torch.ones(2, 8, 32)  # 2048 B: made in the forward, alive after it -> activations
        t = torch.ones(4, 32)  # 512 B: a transient of the forward
        del t
        logits = torch.ones(2, 8, 16)  # 1024 B: last dimension is the vocabulary
        chunk = torch.ones(5, 16, dtype=torch.float64)  # 640 B: a chunk of logits rows
        tr.set_phase("backward")
        g = torch.ones(2, 8, 32)  # 2048 B made in backward
        tr.lookup(g).grad_at = tr.event  # as the post-accumulate-grad hook marks it
        s = torch.ones(1)  # 4 B, a temporary of the backward
    tr.detach()
    res = Curve(tr).summarize()
    assert res["tensor_peak"] == 8192 + 2048 + 1024 + 640 + 2048 + 4
    assert {k: v for k, v in res["breakdown_at_peak"].items() if v} == {
        "weights": 8192, "activations": 2048, "logits": 1024 + 640, "gradients": 2048, "temporaries": 4}
    assert res["peak_phase"] == "backward"
    strict = LogitsRule.for_step(16, 2, 8)  # the step's rows only: 16 and the shifted 14
    assert strict(logits) and not strict(chunk)
    del h, logits, chunk, g, s


def test_in_place_resize_is_followed():
    tr = LiveTensorTracker("cpu")
    with tr:
        tr.set_phase("forward", 1)
        t = torch.empty(10)  # 40 B
        t.resize_(100)  # grows its storage to 400 B
        t.untyped_storage().resize_(800)  # bypasses the dispatcher
    tr.detach()
    assert tr.live_bytes == 800
    assert Curve(tr).summarize()["tensor_peak"] == 800
    del t


def test_backward_of_a_linear_layer_matches_hand_count():
    """y = x @ W.T with W trainable: autograd saves x; backward makes grad_y and W.grad."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16, bias=False)  # W: 16x32 fp32 = 2048 B
    x = torch.randn(8, 32)  # 1024 B, exists before
    tr = LiveTensorTracker("cpu")
    register_model(tr, lin)
    tr.add_existing(x, "input")
    assert tr.live_bytes == 2048 + 1024

    def hook(p):
        rec = tr.lookup(p.grad)
        if rec is not None and rec.grad_at is None:
            rec.grad_at = tr.event

    hooks = [p.register_post_accumulate_grad_hook(hook) for p in lin.parameters()]
    with tr:
        tr.set_phase("forward", 1)
        y = lin(x)  # 8x16 fp32 = 512 B
        loss = y.sum()  # 4 B
        tr.set_phase("backward")
        loss.backward()  # grad of loss (4 B), grad_y 8x16 (512 B, expanded view of a scalar), W.grad 2048 B
    tr.detach()
    for h in hooks:
        h.remove()
    assert lin.weight.grad is not None
    curve = Curve(tr)
    res = curve.summarize()
    at_peak = res["breakdown_at_peak"]
    assert at_peak["adapters"] == 2048  # trainable parameter
    # the peak is W.grad's allocation, before it is accumulated into .grad: in flight
    assert at_peak["temporaries"] >= 2048 and at_peak["gradients"] == 0
    assert at_peak["activations"] >= 1024 + 512  # x (the input) and y, alive after the forward
    assert res["tensor_peak"] == 2048 + 1024 + 512 + 4 + 4 + 2048
    assert curve.breakdown(tr.event - 1)["gradients"] == 2048  # after the hook: a gradient


def test_census_of_a_module_by_category():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    m[1].weight.requires_grad_(False)
    m.register_buffer("scale", torch.ones(3))
    by_cat = census(m, "cpu")
    # trainable: linear weight (64 B) + bias (16 B) + layernorm bias (16 B); frozen: ln weight + buffer
    assert by_cat == {"adapters": 96, "weights": 16 + 12}
    assert census(m, "cpu", adapters=False) == {"weights": 96 + 28}


def test_bitsandbytes_quant_state_is_counted_separately():
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear4bit(128, 64, bias=False, compress_statistics=True, quant_type="nf4",
                            compute_dtype=torch.bfloat16)
    lin.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, compress_statistics=True,
                                   quant_type="nf4")
    lin = lin.to("cpu")
    lin(torch.randn(1, 128, dtype=torch.bfloat16))  # quantizes on first use where needed
    by_cat = census(lin, "cpu")
    if "quant_state" not in by_cat:
        pytest.skip("this bitsandbytes build did not quantize on the CPU")
    assert by_cat["weights"] == 64 * 128 // 2  # packed 4-bit
    # absmax uint8 per 64-block (128), offset fp32, nested absmax fp32 (1 block), nested code fp32[256], code fp32[16]
    assert by_cat["quant_state"] == 128 + 4 + 4 + 256 * 4 + 16 * 4


def test_one_tracker_class_in_the_repository():
    """One TorchDispatchMode tracks tensors for the trace and for qplan run (issue 15)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    found = []
    for path in root.rglob("*.py"):
        if any(part.startswith(".") or part in ("build", "site-packages") for part in path.parts):
            continue
        if re.search(r"class \w+\(TorchDispatchMode\)", path.read_text(encoding="utf-8")):
            found.append(str(path.relative_to(root)))
    assert found == ["observe/tracker.py"], found


def test_cuda_probe_counters_with_a_fake_device(monkeypatch):
    """The CUDA branch of the protocol, on a fake torch.cuda (no GPU here): which counter feeds
    which number, and the context = device_used - reserved at the quiet moment."""
    from qplan.backends import measure

    state = {"allocated": 1_000, "reserved": 2_048, "max_allocated": 0, "max_reserved": 0, "used": 500_000}
    calls = []
    fake = {
        "synchronize": lambda *a: None,
        "empty_cache": lambda: calls.append("empty_cache"),
        "reset_peak_memory_stats": lambda *a: calls.append("reset_peak"),
        "memory_allocated": lambda *a: state["allocated"],
        "memory_reserved": lambda *a: state["reserved"],
        "max_memory_allocated": lambda *a: state["max_allocated"],
        "max_memory_reserved": lambda *a: state["max_reserved"],
        "mem_get_info": lambda *a: (10_000_000 - state["used"], 10_000_000),
        "current_device": lambda: 0,
    }
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(measure, "_nvml_used", lambda index: None)  # falls back to mem_get_info
    probe = measure.Probe("cuda")
    model = torch.nn.Linear(2, 2)
    probe.snapshot("after_prepare", model)
    state.update(allocated=1_500, reserved=4_096, used=504_096)
    probe.snapshot("after_adapters", model, adapters=True)
    probe.start_window(model, None, step=2)
    assert calls[-2:] == ["empty_cache", "reset_peak"]
    state.update(max_allocated=9_000, max_reserved=12_288, used=512_288)
    probe.end_window(step=3)
    mem = probe.memory()
    assert mem["peak_allocated"] == 9_000 and mem["peak_reserved"] == 12_288
    assert mem["device_used"] == 512_288 and mem["device_used_source"] == "mem_get_info"
    assert mem["cuda_context"] == 504_096 - 4_096
    assert mem["peak"] == 12_288 + 500_000
    assert mem["weights"] == 1_000 and mem["window_steps"] == [2, 3]
    assert "tensor_peak" not in mem
