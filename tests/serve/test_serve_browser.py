"""The calculator page as a person uses it: headless Chromium (the system's, driven by Selenium through
the system chromedriver) loads `qplan serve`'s page, changes r and the GPU like a user, and every
number the page shows is read back from the rendered DOM and compared with the API's plan for the
query the page sent — and the API is itself the CLI byte for byte (test_serve_api.py).
``QPLAN_SCREENSHOTS=DIR`` also saves the screenshot the README shows."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from qplan.cli.serve import make_server  # noqa: E402

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
DRIVER = shutil.which("chromedriver") or next((p for p in ("/usr/lib/chromium/chromedriver",) if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="needs Chromium and its driver (Debian packages chromium, chromium-driver); "
                                       ".ci/run installs them")
GiB, MiB = 2 ** 30, 2 ** 20


def fmt(b: int) -> str:
    """The page's bytes() (GiB with 2 decimals, else MiB with 1)."""
    return f"{b / GiB:.2f} GiB" if abs(b) >= GiB else f"{b / MiB:.1f} MiB"


@pytest.fixture(scope="module")
def base():
    server = make_server("127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
              "--window-size=1280,1400", "--no-first-run"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_script_timeout(60)
    yield drv
    drv.quit()


def api(base: str, path: str, query: str) -> tuple[str, dict]:
    with urllib.request.urlopen(f"{base}{path}?{query}", timeout=120) as res:
        text = res.read().decode()
    return text, json.loads(text)


def settled(drv, want: str | None = None, timeout: float = 60) -> str:
    """Wait until the page has rendered a query (containing ``want``); return that query."""
    def ready(d):
        body = d.find_element(By.TAG_NAME, "body")
        q = body.get_attribute("data-query") or ""
        return q if body.get_attribute("data-state") == "ready" and (want is None or want in q.split("&")) else False
    return WebDriverWait(drv, timeout).until(ready)


def check_page(drv, base: str, fit: bool = True) -> dict:
    """Everything shown equals the API's plan (and, with ``fit``, the fit) for the query the page sent."""
    query = settled(drv)
    text, plan = api(base, "/api/estimate", query)
    m, d, g = plan["prediction"]["memory"], plan["prediction"]["memory_detail"], plan["gpu"]
    verdict = drv.find_element(By.ID, "verdict")
    assert int(verdict.get_attribute("data-peak")) == m["peak"]
    assert verdict.get_attribute("data-fits") == json.dumps(plan["prediction"]["fits"])
    if g:
        h = plan["prediction"]["headroom"]
        assert int(verdict.get_attribute("data-headroom")) == h
        word = "FITS" if plan["prediction"]["fits"] else "DOES NOT FIT"
        tail = f"headroom {fmt(h)}" if h >= 0 else f"short by {fmt(-h)}"
        assert verdict.text == f"{word} on {g['name']} ({fmt(g['usable_bytes'])} usable): {tail}"
    # the stacked bar: the composition of the peak moment + CUDA context + allocator slack == peak
    segs = {s.get_attribute("data-term"): int(s.get_attribute("data-bytes"))
            for s in drv.find_elements(By.CSS_SELECTOR, "#bar rect.seg")}
    want = {k: v for k, v in d["composition"][d["peak_phase"]].items() if v > 0}
    want.update(cuda_context=d["cuda_context"], allocator_slack=d["allocator_slack"])
    assert segs == want and sum(segs.values()) == m["peak"]
    if g:
        assert int(drv.find_element(By.ID, "usable").get_attribute("data-bytes")) == g["usable_bytes"]
    rows = drv.find_elements(By.CSS_SELECTOR, "#terms tbody tr")
    assert {r.get_attribute("data-term"): int(r.get_attribute("data-bytes")) for r in rows} == \
        {k: m[k] for k in ("weights", "adapters", "gradients", "optimizer", "activations", "logits", "temporaries",
                           "tensor_peak", "overhead", "peak")}
    for r in rows:  # and the text a person reads
        assert r.find_elements(By.TAG_NAME, "td")[2].text == f"{int(r.get_attribute('data-bytes')):,}"
    mods = drv.find_elements(By.CSS_SELECTOR, "#modules tbody tr")
    per = plan["prediction"]["params"]["per_module"]
    assert [[c.text for c in r.find_elements(By.TAG_NAME, "td")][:6] for r in mods] == \
        [[x["module"], x["kind"], x["shape"], str(x["instances"]), f"{x['params_per_instance']:,}", f"{x['total']:,}"]
         for x in per]
    # the download is the API's document, byte for byte
    href = drv.find_element(By.ID, "download").get_attribute("href")
    got = drv.execute_async_script("const done = arguments[1]; fetch(arguments[0]).then(r => r.text()).then(done, "
                                   "e => done('failed: ' + e))", href)
    assert got == text
    if g and fit:
        sent = ("model", "gpu", "seq-len", "data", "max-seq-len", "batching", "reentrant", "loss")  # as the page's fit
        fq = "&".join(p for p in query.split("&") if p.split("=")[0] in sent) + "&top=8"
        _, fit = api(base, "/api/fit", fq)
        assert [int(r.get_attribute("data-peak")) for r in drv.find_elements(By.CSS_SELECTOR, "#fit tbody tr")] == \
            [r["peak"] for r in fit["best"]]
    return plan


def test_page_numbers_equal_the_api_as_r_and_gpu_change(base, browser, tmp_path):
    drv = browser
    drv.get(base + "/")
    first = check_page(drv, base)
    assert first["lora"]["r"] == 16 and first["gpu"]["name"] == "t4"

    r = drv.find_element(By.ID, "r")
    r.clear()
    r.send_keys("64\t")  # the change event fires on leaving the field, as a person's edit does
    settled(drv, "r=64")
    second = check_page(drv, base)
    assert second["lora"]["r"] == 64
    assert second["prediction"]["memory"]["adapters"] == 4 * first["prediction"]["memory"]["adapters"]

    Select(drv.find_element(By.ID, "gpu")).select_by_value("rtx-4090")
    settled(drv, "gpu=rtx-4090")
    third = check_page(drv, base)
    assert third["gpu"]["name"] == "rtx-4090" and third["lora"]["r"] == 64
    assert "no native bfloat16" not in " ".join(third["warnings"])  # the T4's fp16 switch is gone

    Select(drv.find_element(By.ID, "quant")).select_by_visible_text("bf16")
    settled(drv, "quant=bf16")
    check_page(drv, base)
    folder = Path(os.environ.get("QPLAN_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / "serve.png"
    Select(drv.find_element(By.ID, "quant")).select_by_visible_text("nf4")
    settled(drv, "quant=nf4")
    drv.execute_script("window.scrollTo(0, 0)")
    drv.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000


def test_reentrant_and_torchao_optimizers_from_the_page(base, browser, tmp_path):
    """The page offers reentrant checkpointing (axolotl's, LLaMA-Factory's default) and torchao's optimizers; what
    it shows for them is the API's plan."""
    drv = browser
    drv.get(base + "/")
    settled(drv)
    drv.find_element(By.ID, "reentrant").click()
    settled(drv, "reentrant=true")
    Select(drv.find_element(By.ID, "optimizer")).select_by_visible_text("adamw_torch_8bit")
    settled(drv, "optimizer=adamw_torch_8bit")
    plan = check_page(drv, base)
    assert plan["training"]["grad_ckpt"] == "reentrant" and plan["training"]["optimizer"] == "adamw_torch_8bit"
    folder = Path(os.environ.get("QPLAN_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    drv.execute_script("window.scrollTo(0, 0)")
    drv.save_screenshot(str(folder / "serve-reentrant.png"))


def test_full_fine_tuning_from_the_page(base, browser, tmp_path):
    """The page plans full fine-tuning: the LoRA fields are set aside (not sent), the plan is the API's, the searches
    are full fine-tuning's (the API's fit for the query), and the methods side by side are the API's comparison."""
    drv = browser
    drv.get(base + "/")
    settled(drv)
    Select(drv.find_element(By.ID, "gpu")).select_by_value("a100-80gb")
    settled(drv, "gpu=a100-80gb")
    drv.find_element(By.ID, "full").click()
    query = settled(drv, "full=true")
    assert not {p.split("=")[0] for p in query.split("&")} & {"r", "alpha", "targets", "adapter-dtype"}
    assert drv.find_element(By.ID, "r").get_attribute("disabled") is not None
    plan = check_page(drv, base, fit=False)
    assert plan["method"] == "full" and plan["lora"] is None and plan["quant"]["quant"] == "bf16"
    assert "full fine-tuning" in drv.find_element(By.ID, "summary").text
    sent = ("model", "gpu", "seq-len", "data", "max-seq-len", "batching", "reentrant", "loss", "full")
    _, fit = api(base, "/api/fit", "&".join(p for p in query.split("&") if p.split("=")[0] in sent) + "&top=8")
    assert [int(r.get_attribute("data-peak")) for r in drv.find_elements(By.CSS_SELECTOR, "#fit tbody tr")] == \
        [r["peak"] for r in fit["best"]] and all(r["targets"] == "full" for r in fit["best"])
    assert "full fine-tuning" in drv.find_element(By.ID, "rent-note").text
    # the methods side by side: the API's comparison for the page's query, the full checkbox aside
    cq = "&".join(p for p in query.split("&") if not p.startswith("full=")) + "&methods=full,lora,qlora,lorafa,ia3"
    _, cmp = api(base, "/api/compare", cq)
    shown = [(r.get_attribute("data-method"), r.get_attribute("data-peak"))
             for r in drv.find_elements(By.CSS_SELECTOR, "#compare tbody tr")]
    assert shown == [(r["method"], str(r["peak"])) for r in cmp["methods"]]
    assert [m for m, _ in shown] == ["full", "lora", "qlora", "lorafa", "ia3"]
    assert dict(shown)["full"] == str(plan["prediction"]["memory"]["peak"])  # the page's own plan is the full row
    folder = Path(os.environ.get("QPLAN_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    drv.execute_script("window.scrollTo(0, 0)")
    drv.save_screenshot(str(folder / "serve-full.png"))
    drv.execute_script("document.getElementById('compare-title').scrollIntoView()")
    drv.save_screenshot(str(folder / "serve-compare.png"))


def test_dpo_and_kto_from_the_page(base, browser, tmp_path):
    """The page plans TRL's DPO and KTO trainers: the plan shown is the API's for the page's query, the summary says the
    trainer (and DPO's pairs), the searches (which plan SFT) are set aside, and KTO's batch of one is the CLI's line."""
    drv = browser
    drv.get(base + "/")
    settled(drv)
    Select(drv.find_element(By.ID, "gpu")).select_by_value("a100-80gb")
    settled(drv, "gpu=a100-80gb")
    Select(drv.find_element(By.ID, "objective")).select_by_value("dpo")
    settled(drv, "objective=dpo")
    plan = check_page(drv, base, fit=False)
    assert plan["training"]["objective"] == "dpo" and plan["training"]["loss"] == "trl"
    assert "DPO (TRL)" in drv.find_element(By.ID, "summary").text and "pairs (×2 rows)" in drv.find_element(
        By.ID, "summary").text
    assert drv.find_element(By.ID, "sft-only").is_displayed()
    assert not any(el.is_displayed() for el in drv.find_elements(By.CSS_SELECTOR, "section.sft-only"))
    folder = Path(os.environ.get("QPLAN_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    drv.execute_script("window.scrollTo(0, 0)")
    drv.save_screenshot(str(folder / "serve-dpo.png"))
    # full fine-tuning DPO loads a second model as the reference; precomputing its log-probs drops it
    drv.find_element(By.ID, "full").click()
    settled(drv, "full=true")
    plan = check_page(drv, base, fit=False)
    assert plan["prediction"]["memory_detail"]["weights"]["reference"] > 0
    box = drv.find_element(By.ID, "precompute-ref-log-probs")
    assert box.is_displayed()
    box.click()
    settled(drv, "precompute-ref-log-probs=true")
    plan = check_page(drv, base, fit=False)
    assert plan["training"]["precompute_ref_log_probs"] and "precompute" in plan["prediction"]["memory_detail"]["phases"]
    assert "reference" not in plan["prediction"]["memory_detail"]["weights"]
    drv.execute_script("window.scrollTo(0, 0)")
    drv.save_screenshot(str(folder / "serve-dpo-precompute.png"))
    box.click()
    drv.find_element(By.ID, "full").click()
    settled(drv, "full=false")
    Select(drv.find_element(By.ID, "objective")).select_by_value("kto")  # the page's micro-batch is 1
    WebDriverWait(drv, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
    assert "KTOTrainer refuses it" in drv.find_element(By.ID, "error").text
    b = drv.find_element(By.ID, "batch-size")
    b.clear()
    b.send_keys("2\t")
    settled(drv, "batch-size=2")
    plan = check_page(drv, base, fit=False)
    assert plan["training"]["objective"] == "kto" and plan["training"]["batch_size"] == 2
    Select(drv.find_element(By.ID, "objective")).select_by_value("reward")  # the page's auto quantization: bf16
    query = settled(drv, "objective=reward")
    assert not any(x.startswith("precompute-ref-log-probs=") for x in query.split("&"))  # DPO's and KTO's only
    assert not drv.find_element(By.ID, "precompute-ref-log-probs").is_displayed()
    plan = check_page(drv, base, fit=False)
    assert plan["training"]["objective"] == "reward" and plan["quant"]["quant"] == "bf16"
    assert "reward model (TRL)" in drv.find_element(By.ID, "summary").text
    Select(drv.find_element(By.ID, "objective")).select_by_value("sft")  # the searches come back
    settled(drv, "objective=sft")
    check_page(drv, base)
    assert all(el.is_displayed() for el in drv.find_elements(By.CSS_SELECTOR, "section.sft-only"))


def test_cut_cross_entropy_from_the_page(base, browser, tmp_path):
    """The page offers Cut Cross Entropy; with an Ampere GPU the plan is the API's, and on a T4 the page shows the
    CLI's one line."""
    drv = browser
    drv.get(base + "/")
    settled(drv)
    Select(drv.find_element(By.ID, "gpu")).select_by_value("a100-80gb")
    settled(drv, "gpu=a100-80gb")
    Select(drv.find_element(By.ID, "loss")).select_by_value("cce")
    settled(drv, "loss=cce")
    plan = check_page(drv, base)
    assert plan["training"]["loss"] == "cce"
    folder = Path(os.environ.get("QPLAN_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    drv.execute_script("window.scrollTo(0, 0)")
    drv.save_screenshot(str(folder / "serve-cce.png"))
    Select(drv.find_element(By.ID, "gpu")).select_by_value("t4")
    WebDriverWait(drv, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
    err = drv.find_element(By.ID, "error")
    assert err.is_displayed() and err.text == ("qplan: error: --loss cce: Cut Cross Entropy needs an Ampere or newer "
                                               "GPU (bf16); t4 has none")


def test_a_bad_value_shows_the_cli_line(base, browser):
    drv = browser
    drv.get(base + "/")
    settled(drv)
    r = drv.find_element(By.ID, "r")
    r.clear()
    r.send_keys("0\t")
    WebDriverWait(drv, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
    err = drv.find_element(By.ID, "error")
    assert err.is_displayed() and err.text == "qplan: error: --r: expected `int` >= 1, got 0"


def test_grpo_from_the_page(base, browser, tmp_path):
    """The page plans TRL's GRPO trainer: choosing it sets TRL's batch of 8, shows the generation settings and hides
    the sequence length (a row is prompt + completion); the plan and the generation line are the API's for the page's
    query; vLLM colocated is planned with its share of the GPU."""
    drv = browser
    drv.get(base + "/")
    settled(drv)
    Select(drv.find_element(By.ID, "gpu")).select_by_value("l4")
    settled(drv, "gpu=l4")
    Select(drv.find_element(By.ID, "objective")).select_by_value("grpo")
    query = settled(drv, "objective=grpo")
    assert "batch-size=8" in query.split("&") and not any(x.startswith("seq-len=") for x in query.split("&"))
    assert drv.find_element(By.ID, "num-generations").is_displayed()
    plan = check_page(drv, base, fit=False)
    gen = plan["prediction"]["generation"]
    assert plan["training"]["objective"] == "grpo" and plan["training"]["seq_len"] == 1024
    line = drv.find_element(By.ID, "generation").text
    assert f"{gen['sequences']} completions of 512 + 512 tokens" in line and fmt(gen["kv_cache"]) in line
    assert fmt(gen["tensor_peak"]) in line
    folder = Path(os.environ.get("QPLAN_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    drv.execute_script("window.scrollTo(0, 0)")
    drv.save_screenshot(str(folder / "serve-grpo.png"))
    Select(drv.find_element(By.ID, "vllm")).select_by_value("colocate")
    settled(drv, "vllm=colocate")
    plan = check_page(drv, base, fit=False)
    v = plan["prediction"]["generation"]["vllm"]
    assert f"vLLM holds {fmt(v['reserved'])} all run" in drv.find_element(By.ID, "generation").text
    Select(drv.find_element(By.ID, "objective")).select_by_value("sft")  # the GRPO settings are not sent for SFT
    query = settled(drv, "objective=sft")
    assert not any(x.startswith(("num-generations=", "vllm=")) for x in query.split("&"))
    assert not drv.find_element(By.ID, "num-generations").is_displayed()
