#!/usr/bin/env python3
"""Download the wheels an offline GPU machine needs for the qplan GPU matrix, trimmed to fit.

Run this on a machine that reaches PyPI; carry the folder it fills (default ``.whl/`` in the
repository root) to the GPU machine and install it there with

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site

What the target lacks is written for the device tool's GPU image (bench/gpu/README.md): Python
3.12, x86-64, torch 2.11+cu130, transformers 5.17, peft, accelerate, triton already installed.
Everything here is pinned; `--no-deps` downloads are checked against each wheel's own
``Requires-Dist`` only by eye (see PINS' notes), never resolved.

Two wheels are rewritten so the set stays small (the device tool carries 64 MiB per call,
repository included):

* bitsandbytes ships ``libbitsandbytes_cuda1XX.so`` for every CUDA it supports (43 MiB zipped).
  bitsandbytes loads the one matching ``torch.version.cuda`` (``BNB_CUDA_VERSION`` overrides),
  else the highest packaged one of the same major version not above it, else the lowest above
  (bitsandbytes/cextension.py), never across majors. So only those named by ``--cuda`` are kept
  (default 130: covers every CUDA 13 torch, e.g. the GPU image's 2.11+cu130), plus the CPU one.
* unsloth ships its web UI ("studio", 83 MB unzipped) inside the training library's wheel;
  nothing under ``unsloth/`` imports it, so it is dropped.

A rewritten wheel gets a fresh ``RECORD`` (sha256 and size of every file it still holds) and a
build tag in its file name (``bitsandbytes-0.50.2-1cu130-py3-...whl``), so pip installs it as
the same version while the name says it is not the file PyPI serves.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]

#: The device tool's carry limit is 64 MiB per call including the repository: aim below this.
TARGET_MIB = 50


@dataclass(frozen=True)
class Pin:
    group: str  # "base": peft runs; "unsloth": the unsloth backend; "cce": optional extras
    req: str    # name==version, exactly as pip downloads it
    why: str


#: What the GPU image lacks. Versions: the set a CPU install of unsloth 2026.10.9 resolved to
#: with transformers 5.17.0 (unsloth pins transformers<=5.17.0 and trl<=1.15.0); unsloth's own
#: requirement certifi>=2026.10.19 is unmet on PyPI today and irrelevant here (--no-deps).
PINS: tuple[Pin, ...] = (
    Pin("base", "bitsandbytes==0.50.2", "4-bit/8-bit weights and 8-bit optimizers (trimmed to --cuda)"),
    Pin("base", "datasets==4.8.5", "qplan[train], trl and unsloth import it; <5 for unsloth"),
    Pin("base", "dill==0.4.1", "datasets: dill<0.4.2"),
    Pin("base", "multiprocess==0.70.19", "datasets: multiprocess<0.70.20 (pure-Python, per-Python wheel)"),
    Pin("unsloth", "unsloth==2026.10.9", "the unsloth backend (web UI 'studio' dropped)"),
    Pin("unsloth", "unsloth_zoo==2026.10.9", "unsloth's runtime patches and kernels"),
    Pin("unsloth", "trl==1.15.0", "unsloth imports trl (trl<=1.15.0)"),
    Pin("unsloth", "tyro==1.0.17", "unsloth / unsloth_zoo requirement"),
    Pin("unsloth", "docstring-parser==0.18.0", "tyro"),
    Pin("unsloth", "typeguard==4.6.0", "tyro"),
    Pin("unsloth", "msgspec==0.22.0", "unsloth_zoo requirement (compiled, cp312)"),
    Pin("unsloth", "nest-asyncio==1.6.0", "unsloth/import_fixes.py imports it"),
    Pin("unsloth", "json5==0.17.3", "unsloth requirement"),
    Pin("unsloth", "structlog==26.1.0", "unsloth requirement"),
    Pin("cce", "cut_cross_entropy==25.1.1", "optional: Apple's cut cross-entropy (UNSLOTH_ENABLE_CCE=1)"),
)

#: Names whose files this script rewrites, and how.
BNB_LIB = re.compile(r"^bitsandbytes/libbitsandbytes_([a-z]+)(\d*)\.so$")


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def rewrite_wheel(src: Path, dst: Path, keep, edit=None) -> list[str]:
    """Copy wheel ``src`` to ``dst`` keeping the members ``keep(name)`` accepts; regenerate RECORD.

    ``edit(name, data) -> data`` may change a kept member. Returns the dropped member names.
    """
    dropped: list[str] = []
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        records = [n for n in names if n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise SystemExit(f"{src.name}: expected one .dist-info/RECORD, found {records}")
        record_name = records[0]
        rows: list[str] = []
        with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                name = info.filename
                if name == record_name:
                    continue
                if not keep(name):
                    dropped.append(name)
                    continue
                data = zin.read(name)
                if edit is not None:
                    data = edit(name, data)
                new = zipfile.ZipInfo(name, date_time=info.date_time)
                new.external_attr = info.external_attr
                new.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(new, data)
                if not name.endswith("/"):
                    rows.append(f"{name},{record_hash(data)},{len(data)}")
            rows.append(f"{record_name},,")
            rec = zipfile.ZipInfo(record_name, date_time=(2020, 1, 1, 0, 0, 0))
            rec.external_attr = 0o644 << 16
            rec.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(rec, "\n".join(rows) + "\n")
    return dropped


def with_build_tag(wheel_name: str, tag: str) -> str:
    """``pkg-1.0-py3-none-any.whl`` -> ``pkg-1.0-<tag>-py3-none-any.whl`` (tag starts with a digit)."""
    parts = wheel_name[:-4].split("-")
    if len(parts) == 6:  # already has a build tag: replace it
        parts.pop(2)
    if len(parts) != 5 or not tag[:1].isdigit():
        raise ValueError(f"cannot tag {wheel_name!r} with {tag!r}")
    return "-".join(parts[:2] + [tag] + parts[2:]) + ".whl"


def cuda_keep(spec: str):
    """Predicate on bitsandbytes library versions: '130', '130,132', '13' (all 13.x), '12', 'all'."""
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    if "all" in wanted:
        return None

    def keep(name: str) -> bool:
        m = BNB_LIB.match(name)
        if not m:
            return True
        kind, ver = m.groups()
        if kind == "cpu":
            return True
        if kind != "cuda":  # rocm, xpu
            return False
        return any(ver == w or (len(w) == 2 and ver.startswith(w)) for w in wanted)

    return keep


def trim_bitsandbytes(src: Path, dest: Path, cuda: str) -> tuple[Path, list[str]]:
    keep = cuda_keep(cuda)
    if keep is None:
        out = dest / src.name
        shutil.copy2(src, out)
        return out, []
    with zipfile.ZipFile(src) as z:
        kept_cuda = sorted(n for n in z.namelist() if BNB_LIB.match(n) and "cuda" in n and keep(n))
    if not kept_cuda:
        raise SystemExit(f"--cuda {cuda}: no libbitsandbytes_cuda*.so in {src.name} matches")
    tag = "1" + "".join("cu" + BNB_LIB.match(n).group(2) for n in kept_cuda)
    out = dest / with_build_tag(src.name, tag)
    dropped = rewrite_wheel(src, out, keep)
    return out, dropped


def trim_unsloth(src: Path, dest: Path) -> tuple[Path, list[str]]:
    def keep(name: str) -> bool:
        return not name.startswith("studio/")

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith(".dist-info/top_level.txt"):
            return b"".join(line + b"\n" for line in data.splitlines() if line.strip() != b"studio")
        return data

    out = dest / with_build_tag(src.name, "1nostudio")
    return out, rewrite_wheel(src, out, keep, edit)


def verify_wheel(path: Path) -> None:
    """Every member but RECORD is listed in RECORD with the right hash and size (what pip checks)."""
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad:
            raise SystemExit(f"{path.name}: corrupt member {bad}")
        record_name = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        rows = {}
        for line in z.read(record_name).decode().splitlines():
            if line.strip():
                name, h, size = line.rsplit(",", 2)
                rows[name] = (h, size)
        for name in z.namelist():
            if name.endswith("/") or name == record_name:
                continue
            if name not in rows:
                raise SystemExit(f"{path.name}: {name} missing from RECORD")
            data = z.read(name)
            h, size = rows[name]
            if h and (h != record_hash(data) or int(size) != len(data)):
                raise SystemExit(f"{path.name}: RECORD hash/size mismatch for {name}")


def pip_download(reqs: list[str], dest: Path, python_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += reqs
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def build_qplan_wheel(dest: Path) -> Path:
    """Build qplan's wheel from a copy of the packaged folders (keeps build/ out of the checkout)."""
    with tempfile.TemporaryDirectory(prefix="qplan-src-") as tmp:
        src = Path(tmp) / "qplan"
        src.mkdir()
        for f in ("pyproject.toml", "README.md", "LICENSE"):
            if (REPO / f).is_file():
                shutil.copy2(REPO / f, src / f)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for d in ("planner", "backends", "model_specs"):
            shutil.copytree(REPO / d, src / d, ignore=ignore)
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        (wheel,) = out.glob("qplan-*.whl")
        target = dest / wheel.name
        shutil.copy2(wheel, target)
        return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=str(REPO / ".whl"), help="folder to fill [default: <repo>/.whl]")
    ap.add_argument("--cuda", default="130",
                    help="bitsandbytes CUDA libraries to keep: 130 (torch cu130, default), '130,132', "
                         "'13' (all 13.x), '128', '12' (all 12.x), 'all' (untrimmed, 43 MiB)")
    ap.add_argument("--python-version", default="3.12", help="target interpreter [default: 3.12]")
    ap.add_argument("--no-unsloth", action="store_true", help="peft runs only: skip unsloth and its needs")
    ap.add_argument("--with-cce", action="store_true",
                    help="add cut_cross_entropy (unsloth uses it only with UNSLOTH_ENABLE_CCE=1)")
    ap.add_argument("--no-qplan", action="store_true", help="do not build qplan's own wheel")
    ap.add_argument("--clean", action="store_true", help="empty --dest of *.whl first")
    args = ap.parse_args(argv)

    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    if args.clean:
        for old in dest.glob("*.whl"):
            old.unlink()
    groups = {"base"} | (set() if args.no_unsloth else {"unsloth"}) | ({"cce"} if args.with_cce else set())
    pins = [p for p in PINS if p.group in groups]

    made: list[tuple[Path, str]] = []
    with tempfile.TemporaryDirectory(prefix="qplan-whl-") as tmp:
        raw = Path(tmp)
        pip_download([p.req for p in pins], raw, args.python_version)
        for wheel in sorted(raw.glob("*.whl")):
            low = wheel.name.lower()
            if low.startswith("bitsandbytes-"):
                out, dropped = trim_bitsandbytes(wheel, dest, args.cuda)
                note = (f"trimmed from {wheel.stat().st_size / 2**20:.1f} MiB, dropped {len(dropped)} files"
                        if dropped else "untrimmed (--cuda all)")
            elif low.startswith("unsloth-"):
                out, dropped = trim_unsloth(wheel, dest)
                note = f"trimmed from {wheel.stat().st_size / 2**20:.1f} MiB, dropped {len(dropped)} studio files"
            else:
                out = dest / wheel.name
                shutil.copy2(wheel, out)
                note = ""
            verify_wheel(out)
            made.append((out, note))
    if not args.no_qplan:
        made.append((build_qplan_wheel(dest), "built from this checkout"))

    # One version per distribution: two stop the whole `pip install .whl/*.whl`.
    seen: dict[str, Path] = {}
    for w in sorted(dest.glob("*.whl")):
        dist = w.name.split("-")[0].lower().replace("_", "-")
        if dist in seen:
            print(f"warning: two wheels of {dist} in {dest}: {seen[dist].name} and {w.name}; "
                  f"remove one (or pass --clean)", file=sys.stderr)
        seen[dist] = w

    total = 0
    print(f"\n{'wheel':78} {'MiB':>7}")
    for w in sorted(dest.glob("*.whl")):
        size = w.stat().st_size
        total += size
        note = next((n for p, n in made if p == w), "")
        print(f"{w.name:78} {size / 2**20:7.2f}  {note}")
    print(f"{'total':78} {total / 2**20:7.2f} MiB in {dest}")
    manifest = dest / "MANIFEST.txt"
    manifest.write_text(
        "# written by bench/gpu/prepare_wheels.py; install with:\n"
        "# python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site\n"
        + "".join(f"{w.name} {w.stat().st_size} {record_hash(w.read_bytes())}\n" for w in sorted(dest.glob('*.whl'))),
        encoding="utf-8",
    )
    if total > TARGET_MIB * 2**20:
        print(f"warning: {total / 2**20:.1f} MiB is over the {TARGET_MIB} MiB aim (the device tool "
              f"carries 64 MiB per call, repository included)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
