"""The seams of the architecture, checked (issue 15) — torch-free, so they run first and fast.

* the README's worked example is what ``qplan estimate`` prints today, byte for byte, with torch
  unimportable (a blocker on ``sys.meta_path``);
* ``planner/`` imports nothing from ``backends``, ``cli``, ``hf`` or ``observe`` at module level,
  and no torch/transformers/peft/bitsandbytes at module level;
* ``AutoConfig``, ``BitsAndBytesConfig`` and ``LoraConfig`` are built in one place (``hf/``);
* no source file is over 600 lines; the library API is the planner's, not the CLI's;
* no import circles anywhere in the repository's packages, deferred imports included, and each of
  the planner's layers imports only its own and lower layers (ARCHITECTURE.md).
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
    mods = [_module_name(p) for p in _sources("planner")]
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
    from qplan.planner.api import plan_dict

    plan = plan_dict(model="smollm2-135m", r=8, gpu="t4")
    assert plan["model"]["name"] == "smollm2-135m" and plan["training"]["mixed_precision"] == "fp16"


# ------------------------------------------------------------------------------ import graph

#: the planner's layers, lowest first: a module imports only its own layer and lower ones
LAYERS = {
    "core": 0,      # errors, vocab, files, bounds, validate, options, data (--data: records, formats, batching)
    "model": 1,     # specs, GPUs, Hub, inventory, LoRA counts, weights
    "interop": 1,   # trainer configs in and out (options only)
    "memory": 2,    # memory terms, activations, phases, profiles
    "compute": 3,   # FLOPs, timing, calibration
    "plan": 4,      # plan (the document), render
    "search": 5,    # fit, fewest GPUs, suggestions, and the api on top
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["qplan", *parts])


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    if parts[:2] != ["qplan", "planner"]:
        return None
    sub = parts[2] if len(parts) > 2 else ""
    if sub in ("model", "interop", "memory", "compute", "search"):
        return LAYERS[sub]
    if sub in ("plan", "render", "methods", "objectives"):  # methods, objectives: the plan's inputs (PEFT method, trainer)
        return LAYERS["plan"]
    if sub == "api":
        return LAYERS["search"]
    return LAYERS["core"]


def import_graph() -> dict[str, set[str]]:
    """Module -> the repository modules it imports anywhere in its body (deferred imports included)."""
    files = {_module_name(p): p for p in _sources(*PACKAGES)}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in files else target)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        graph[mod] = {e for e in edges if e in files and e != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 50 and "qplan.planner.memory.profiles" in graph
    assert _cycles(graph) == []


def test_planner_layers_import_downwards():
    bad = [f"{m} -> {d}" for m, deps in import_graph().items() if _layer(m) is not None
           for d in deps if _layer(d) is not None and _layer(d) > _layer(m)]
    assert not bad, bad


# ---------------------------------------------------------------------------- one options model


def test_generated_references_are_current():
    """docs/options.md and docs/plan-json.md are what ``python -m qplan.cli.reference`` writes from
    ``PlanOptions``/``FitOptions`` and ``PlanDoc`` today."""
    from qplan.cli.reference import FILES

    for name, make in FILES.items():
        assert (ROOT / "docs" / name).read_text(encoding="utf-8") == make(), \
            f"docs/{name} is stale: run `python -m qplan.cli.reference`"


@pytest.mark.parametrize("command", ["estimate", "fit"])
def test_every_option_is_documented_from_the_model(command):
    """Each option of the command is a field of its options model (the planning options) or one of the
    command's own input/output options, and every one of them is in docs/options.md."""
    from qplan.cli.plan_commands import estimate, fit
    from qplan.planner.options import FitOptions, PlanOptions, option_infos

    cmd, cls = {"estimate": (estimate, PlanOptions), "fit": (fit, FitOptions)}[command]
    own = {"fmt", "output", "force", "method", "from_config", "config_format"}
    fields = {o.name for o in option_infos(cls)}
    params = {p.name for p in cmd.params}
    assert fields <= params and params - fields <= own, params ^ fields
    text = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    section = text.split(f"## `qplan {command}`", 1)[1].split("\n## ", 1)[0]
    for p in cmd.params:
        assert f"`{p.opts[0]}" in section, f"{p.opts[0]} of qplan {command} is not in docs/options.md"


def test_options_model_gives_bounds_defaults_and_flags():
    """The model is what the CLI enforces: a default from the field, a bound from its type, a flag name
    from its metadata (``--attn`` for ``attn_impl``)."""
    from qplan.cli.main import main
    from qplan.planner.options import PlanOptions, check_options, option_infos

    infos = {o.name: o for o in option_infos(PlanOptions)}
    assert infos["attn_impl"].flag == "--attn" and infos["r"].default == PlanOptions().r == 16
    assert ("le", 1 << 16) in infos["r"].bounds and infos["quant"].choices[0] == "nf4"
    with pytest.raises(Exception, match="--r"):
        check_options({"r": 0})
    with pytest.raises(Exception, match="--attn"):
        check_options({"attn_impl": "flash9"})
    assert main(["estimate", "--model", "smollm2-135m", "--r", "0"]) == 2


def test_every_qplan_import_names_a_module_that_exists():
    """Benchmarks, scripts and tests import moved modules by their new names (nothing imports a module
    that is gone: those imports sit in functions that only run in a benchmark)."""
    known = set(import_graph()) | {"qplan"}
    missing = []
    # plan_identity.py falls back to the CLI module of commits before the library API, on purpose
    for path in [p for p in _sources(*PACKAGES, "bench", "tests", "scripts") if p.name != "plan_identity.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            missing += [f"{path.relative_to(ROOT)}: {n}" for n in names if n and n.startswith("qplan") and n not in known]
    assert not missing, missing
