"""The live-tensor tracker is the CPU oracle: check it against byte counts worked out by hand."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qplan.backends.measure import LiveTensorTracker, census, register_existing  # noqa: E402


def test_counts_new_storages_once_and_follows_frees():
    tr = LiveTensorTracker("cpu")
    with tr:
        a = torch.zeros(1000)  # 4000 B
        b = a * 2  # 4000 B
        v = b.view(10, 100)  # a view: no new storage
        del b
        assert tr.current == 8000
        del v  # last reference to b's storage
        assert tr.current == 4000
        c = torch.ones(250, dtype=torch.float64)  # 2000 B
    tr.close()
    assert tr.peak == 8000
    assert tr.current == 6000
    assert tr.breakdown() == {"other": 6000}  # made outside any phase
    del a, c


def test_existing_tensors_and_categories_and_logits():
    w = torch.zeros(64, 32)  # 8192 B
    tr = LiveTensorTracker("cpu", vocab=16)
    assert tr.add(w, "weights") is True
    assert tr.add(w[:10], "weights") is False  # same storage
    with tr:
        tr.set_phase("forward")
        h = torch.ones(2, 8, 32)  # 2048 B activations
        logits = torch.ones(2, 8, 16)  # 1024 B: last dimension is the vocabulary
        chunk = torch.ones(5, 16, dtype=torch.float64)  # 640 B: a chunk of logits rows
        tr.set_phase("backward")
        g = torch.ones(2, 8, 32)  # 2048 B made in backward
        tr.relabel(g, "gradients")
    tr.close()
    assert tr.peak == 8192 + 2048 + 1024 + 640 + 2048
    assert tr.peak_by_category == {"weights": 8192, "activations": 2048, "logits": 1024 + 640, "gradients": 2048}
    assert tr.peak_phase == "backward"
    del h, logits, chunk, g


def test_in_place_resize_is_followed():
    tr = LiveTensorTracker("cpu")
    with tr:
        t = torch.empty(10)  # 40 B
        t.resize_(100)  # grows its storage to 400 B
    tr.close()
    assert tr.current == 400
    assert tr.peak == 400
    del t


def test_backward_of_a_linear_layer_matches_hand_count():
    """y = x @ W.T with W trainable: autograd saves x; backward makes grad_y and W.grad."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16, bias=False)  # W: 16x32 fp32 = 2048 B
    x = torch.randn(8, 32)  # 1024 B, exists before
    tr = LiveTensorTracker("cpu")
    register_existing(tr, lin, sweep=False)
    tr.add(x, "other")
    assert tr.current == 2048 + 1024
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tr.relabel(p.grad, "gradients")) for p in lin.parameters()]
    with tr:
        tr.set_phase("forward")
        y = lin(x)  # 8x16 fp32 = 512 B
        loss = y.sum()  # 4 B
        tr.set_phase("backward")
        loss.backward()  # grad of loss (4 B), grad_y 8x16 (512 B, expanded view of a scalar), W.grad 2048 B
    tr.close()
    for h in hooks:
        h.remove()
    assert lin.weight.grad is not None
    at_peak = tr.peak_by_category
    assert at_peak["adapters"] == 2048  # trainable parameter
    assert at_peak["gradients"] == 2048
    assert tr.peak >= 2048 + 1024 + 512 + 2048
    assert tr.by_category["gradients"] == 2048  # still alive after backward


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
    assert by_cat["quant_state"] > 0


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
