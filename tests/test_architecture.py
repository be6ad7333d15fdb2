"""The seams of the architecture, checked (issue 15) — torch-free, so they run first and fast.

* the README's worked example is what ``qplan estimate`` prints today, byte for byte, with torch
  unimportable (a blocker on ``sys.meta_path``);
* ``planner/`` imports nothing from ``backends``, ``cli``, ``hf`` or ``observe`` at module level,
  and no torch/transformers/peft/bitsandbytes at module level;
* ``AutoConfig``, ``BitsAndBytesConfig`` and ``LoraConfig`` are built in one place (``hf/``);
* no source file is over 600 lines; the library API is the planner's, not the CLI's.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("planner", "backends", "cli", "hf", "observe", "model_specs")
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "numpy", "unsloth", "trl")

#: blocks the heavy libraries: an import of any of them fails loudly
BLOCKER = (
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    f"        if name.split('.')[0] in {HEAVY!r}:\n"
    "            raise ImportError('blocked heavy import: ' + name)\n"
    "sys.meta_path.insert(0, _Block())\n"
)


def _sources(*folders: str) -> list[Path]:
    out = []
    for folder in folders:
        out += sorted((ROOT / folder).rglob("*.py"))
    return out


def _readme_example() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"## Worked example\n+```\n\$ (qplan estimate [^\n]+)\n```\n+```\n(.*?)```", text, re.S)
    assert m, "README.md has no worked example block"
    return m.group(1), m.group(2)


def test_readme_worked_example_is_what_qplan_prints_without_torch():
    command, expected = _readme_example()
    args = command.split()[1:]
    code = BLOCKER + f"from qplan.cli.main import main\nsys.exit(main({args!r}))\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected, "README's worked example drifted: paste the output of `" + command + "`"


def _module_level_imports(path: Path) -> list[str]:
    """Modules imported at module level (not inside functions / TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = ".".join(path.relative_to(ROOT).parts[:-1])
    out = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package folder
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                out.append(".".join(["qplan", *base] + ([node.module] if node.module else [])))
            else:
                out.append(node.module or "")
    return out


@pytest.mark.parametrize("path", _sources("planner"), ids=lambda p: str(p.relative_to(ROOT)))
def test_planner_is_torch_free_and_independent(path):
    for mod in _module_level_imports(path):
        top = mod.split(".")[0]
        assert top not in HEAVY, f"{path.name} imports {mod} at module level"
        assert not mod.startswith(("qplan.backends", "qplan.cli", "qplan.observe", "qplan.hf")), \
            f"{path.name} imports {mod}: the planner must not depend on the torch side or the CLI"
    text = path.read_text(encoding="utf-8")
    assert "qplan.backends" not in text and "from qplan.cli" not in text, f"{path.name} reaches into backends/cli"


def test_planner_modules_import_without_torch():
    mods = [f"qplan.planner.{p.stem}" for p in _sources("planner") if p.stem != "__init__"]
    code = BLOCKER + "".join(f"import {m}\n" for m in mods) + "print('ok')\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def _calls(path: Path, name: str) -> list[int]:
    """Lines where ``name(...)`` or ``name.<method>(...)`` is called (the AST, not the prose)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                f = f.value
            if isinstance(f, ast.Name) and f.id == name:
                out.append(node.lineno)
    return out


@pytest.mark.parametrize("name", ["AutoConfig", "BitsAndBytesConfig", "LoraConfig"])
def test_hugging_face_objects_are_built_in_one_place(name):
    """The plan -> Hugging Face mapping is ``hf/``; nothing else builds these objects (the
    benchmarks and the tests' oracles load models through it too)."""
    builders = [f"{p.relative_to(ROOT)}:{n}" for p in _sources(*PACKAGES, "bench", "tests", "scripts")
                for n in _calls(p, name)]
    assert builders and {b.split(":")[0] for b in builders} == {"hf/__init__.py"}, builders


def test_qplan_uses_no_name_transformers_deprecated():
    """The two deprecations pytest lets through (pyproject: PEFT still calls them) must not come
    from qplan's own code."""
    for path in _sources(*PACKAGES, "bench"):
        text = path.read_text(encoding="utf-8")
        for name in ("is_gradient_checkpointing", ".gradient_checkpointing_enable("):
            assert name not in text, f"{path.relative_to(ROOT)} uses {name}"


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in _sources(*PACKAGES, "bench", "tests", "scripts")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, long


def test_the_library_api_is_the_planner_not_the_cli():
    """Tests, benchmarks and the CLI plan through ``qplan.planner.api``; nothing imports the CLI's
    internals for planning."""
    users = [p for p in _sources("bench", "tests", "backends") if "plan_from_options" in p.read_text(encoding="utf-8")]
    # plan_identity.py reads commits from before the API; this file names the old function
    users = [p for p in users if p.name not in ("plan_identity.py", Path(__file__).name)]
    assert not users, users
    from qplan.planner.api import make_plan

    plan = make_plan(model="smollm2-135m", r=8, gpu="t4")
    assert plan["model"]["name"] == "smollm2-135m" and plan["training"]["mixed_precision"] == "fp16"
