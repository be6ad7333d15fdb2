"""Config files in: the mapping in a YAML or JSON file (a trainer config for ``--from-config``, a price file for
``qplan fit --prices``), read with PyYAML's safe loader (plain data, no tags that build objects), bounded in size,
aliases and integer digits so that a hostile file is one line, not a hang. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.files import read_limited

MAX_CONFIG_BYTES = 1 << 20
#: nodes a trainer config may hold once its aliases (``*name``) are expanded (an alias bomb holds billions)
MAX_YAML_NODES = 100_000
#: digits of an integer in a trainer config (a 400-digit lora_alpha overflows a float; 5,000 digits are refused by int())
MAX_INT_DIGITS = 30


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is a dependency
        raise QPlanError("reading YAML configs needs PyYAML: pip install pyyaml") from exc
    return yaml


class _Refused(Exception):
    """Raised by the bounded loader; read_config_file turns it into the one line."""


def _expanded_nodes(root: Any, yaml: Any) -> int:
    """How many nodes the document holds with every alias expanded (shared nodes counted each time they are
    used), computed once per node; an alias inside its own anchor is refused."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise _Refused("has an alias inside its own anchor (a value that contains itself)")
        busy.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(size(v) for v in node.value)
        elif isinstance(node, yaml.MappingNode):
            n += sum(size(k) + size(v) for k, v in node.value)
        busy.discard(key)
        sizes[key] = n
        if n > MAX_YAML_NODES:
            raise _Refused(f"expands to over {MAX_YAML_NODES:,} values through its aliases (&anchor / *alias): "
                           "is it a trainer config?")
        return n

    return size(root)


def _bounded_loader(yaml: Any) -> Any:
    """PyYAML's SafeLoader with aliases bounded by ``MAX_YAML_NODES`` and integers by ``MAX_INT_DIGITS``."""

    class BoundedLoader(yaml.SafeLoader):
        def construct_document(self, node: Any) -> Any:
            _expanded_nodes(node, yaml)
            return super().construct_document(node)

        def construct_yaml_int(self, node: Any) -> Any:
            text = str(node.value)
            if len(text) > MAX_INT_DIGITS:
                line = f" (line {node.start_mark.line + 1})" if node.start_mark is not None else ""
                raise _Refused(f"has an integer of {len(text):,} digits{line}: at most {MAX_INT_DIGITS}")
            return super().construct_yaml_int(node)

    BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
    return BoundedLoader


def read_config_file(path: str | Path, what: str = "--from-config", kind: str = "a trainer config") -> dict[str, Any]:
    """The mapping in a YAML or JSON file (``what``: the option naming it in errors; ``kind``: what it should hold);
    unreadable, not UTF-8, not a mapping: one line."""
    p = Path(path)
    raw = read_limited(p, what, MAX_CONFIG_BYTES)  # a regular file of at most 1 MiB, never read past it
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QPlanError(f"{what} {p} is not UTF-8 text (byte {exc.start})") from exc
    yaml = _yaml()
    try:
        data = yaml.load(text, Loader=_bounded_loader(yaml))
    except _Refused as exc:
        raise QPlanError(f"{what} {p} {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise QPlanError(f"{what} {p} is not valid YAML or JSON{where}: {getattr(exc, 'problem', None) or exc}") from exc
    except RecursionError as exc:
        raise QPlanError(f"{what} {p} nests too deeply") from exc
    except ValueError as exc:  # a value PyYAML's constructors cannot build (a date out of range, ...)
        raise QPlanError(f"{what} {p} has a value that cannot be read: {' '.join(str(exc).split())[:120]}") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise QPlanError(f"{what} {p} is not a mapping of keys to values ({kind} is)")
    return data
