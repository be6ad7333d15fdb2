"""Which keys of a TRL config belong to a trainer other than SFT: the data file the TRL config reader refuses them by.

Every ``TrainingArguments`` subclass that TRL exports (``trl.*Config``, ``trl.experimental.*._config``) less the keys
``SFTConfig``, ``ModelConfig`` and ``ScriptArguments`` take: a file with one of them is a DPO / GRPO / distillation
/ reward / ... run, which qplan does not plan as SFT. Written to ``planner/interop/trl_objective_keys.json``;
``tests/planner/test_trainer_configs.py`` checks the file equals what the installed TRL gives.

    python bench/trl_objective_keys.py
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "planner" / "interop" / "trl_objective_keys.json"


def objective_keys() -> dict:
    import warnings

    import trl
    from transformers import TrainingArguments

    with warnings.catch_warnings():  # "you are importing from trl.experimental": that is the point here
        warnings.simplefilter("ignore")
        import trl.experimental

    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    sft = fields(trl.SFTConfig) | fields(trl.ModelConfig) | fields(trl.ScriptArguments)
    configs = {n: getattr(trl, n) for n in dir(trl) if n.endswith("Config")}
    for m in pkgutil.walk_packages(trl.experimental.__path__, "trl.experimental."):
        if m.name.endswith("_config"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mod = importlib.import_module(m.name)
            except Exception:  # noqa: BLE001 - an experimental module with an optional dependency
                continue
            configs.update({n: c for n, c in inspect.getmembers(mod, inspect.isclass)
                            if n.endswith("Config") and c.__module__ == mod.__name__})
    keys: dict[str, list[str]] = {}
    for name, cls in sorted(configs.items()):
        if name == "SFTConfig" or not (dataclasses.is_dataclass(cls) and issubclass(cls, TrainingArguments)):
            continue
        for k in sorted(fields(cls) - sft):
            keys.setdefault(k, []).append(name.removesuffix("Config"))
    return {"trl_version": trl.__version__, "keys": dict(sorted(keys.items()))}


def main() -> None:
    OUT.write_text(json.dumps(objective_keys(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
