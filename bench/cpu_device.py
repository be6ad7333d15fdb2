"""Measure this CPU as a qplan device: dense matmul throughput (bf16, fp32) and memory bandwidth.

    python bench/cpu_device.py [--out reports/benchmarks/cpu-device.json]

The file has the GPU catalog's fields, so `qplan estimate --gpu reports/benchmarks/cpu-device.json`
predicts the step time of a CPU run, and `qplan calibrate ... --gpu <file>` fits its efficiency
(bench/time_cpu.py). Throughput: the best of 5 timed `torch.mm` of two n x n matrices (2 n^3 FLOPs
each) with torch's default threads; bandwidth: the best of 5 copies of a 256 MiB tensor (read +
write). The numbers describe this machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path


def matmul_tflops(dtype, n: int = 1536, reps: int = 5) -> float:
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def bandwidth_gb_s(mib: int = 256, reps: int = 5) -> float:
    import torch

    src = torch.empty(mib * 2 ** 20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/benchmarks/cpu-device.json")
    a = ap.parse_args()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    doc = {
        "name": "cpu",
        "full_name": cpu_name(),
        "architecture": platform.machine(),
        "compute_capability": "",
        "total_bytes": ram,
        "usable_bytes": ram,
        "bf16": True,
        "peak_bf16_tflops": round(matmul_tflops(torch.bfloat16), 4),
        "peak_fp16_tflops": None,
        "peak_fp32_tflops": round(matmul_tflops(torch.float32), 4),
        "memory_bandwidth_gb_s": round(bandwidth_gb_s(), 2),
        "source": {
            "command": "python bench/cpu_device.py",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "method": "best of 5 torch.mm of 1536x1536 matrices (2 n^3 FLOPs); best of 5 copies of 256 MiB (read+write)",
        },
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
