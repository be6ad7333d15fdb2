"""Check trainer configs with axolotl's and LLaMA-Factory's own code, which cannot be installed beside
qplan's pins (their dependency trees conflict with them): run it in a separate venv where the tool is
installed with ``pip install --no-deps axolotl==0.19.0 llamafactory==0.9.5`` (plus omegaconf, tyro)
on top of qplan's packages, with ``DISABLE_VERSION_CHECK=1`` (LLaMA-Factory pins transformers<=5.6).

    python scripts/trainer_tools.py keys                 # rewrite tests/fixtures/trainer_keys/*.json
    python scripts/trainer_tools.py validate FILE...     # axolotl-*.yml / llamafactory-*.yaml files

``validate`` builds axolotl's ``AxolotlInputConfig`` from a file, and parses a LLaMA-Factory file with
its ``_parse_train_args`` (HfArgumentParser over its argument dataclasses, no extra keys allowed;
``use_cpu`` added because a CPU machine refuses bf16 otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib import metadata
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "trainer_keys"


def keys() -> None:
    from axolotl.utils.schemas.config import AxolotlInputConfig
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
    from llamafactory.hparams.training_args import TrainingArguments

    ax = metadata.version("axolotl")
    lf = metadata.version("llamafactory")
    lf_classes = (ModelArguments, DataArguments, FinetuningArguments, GeneratingArguments, TrainingArguments)
    docs = {
        f"axolotl-{ax}.json": ("axolotl " + ax, "AxolotlInputConfig.model_fields", sorted(AxolotlInputConfig.model_fields)),
        f"llamafactory-{lf}.json": ("llamafactory " + lf, "the init fields of " + ", ".join(c.__name__ for c in lf_classes),
                                    sorted({f.name for c in lf_classes for f in dataclasses.fields(c) if f.init})),
    }
    for name, (tool, source, names) in docs.items():
        doc = {"tool": tool, "source": source, "made_by": "python scripts/trainer_tools.py keys", "keys": names}
        (OUT / name).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {OUT / name}: {len(names)} keys")


def validate(files: list[str]) -> None:
    for f in files:
        cfg = yaml.safe_load(Path(f).read_text())
        if Path(f).name.startswith("axolotl"):
            from axolotl.utils.schemas.config import AxolotlInputConfig

            m = AxolotlInputConfig(**cfg)
            print(f"axolotl accepts {f}: adapter {m.adapter}, r {m.lora_r}, optimizer {m.optimizer}")
        else:
            from llamafactory.hparams.parser import _parse_train_args

            model_args, data_args, training_args, finetuning_args, _ = _parse_train_args({**cfg, "use_cpu": True})
            print(f"LLaMA-Factory accepts {f}: rank {finetuning_args.lora_rank}, bits {model_args.quantization_bit}, "
                  f"optim {training_args.optim}, cutoff {data_args.cutoff_len}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["keys"]:
        keys()
    elif sys.argv[1:2] == ["validate"] and sys.argv[2:]:
        validate(sys.argv[2:])
    else:
        sys.exit(__doc__)
