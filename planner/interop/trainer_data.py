"""The data a trainer config names, read into ``--data`` options (``trainer_configs``): TRL's ``dataset_name`` and
axolotl's ``datasets:`` (with its collator's padding rules); LLaMA-Factory's bound. Torch-free; the dataset itself
is read when planned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qplan.planner.data.axolotl import PAD_MULTIPLE
from qplan.planner.data.batching import round_up
from qplan.planner.errors import QPlanError, shown
from qplan.planner.interop.notes import note


def trl_data(r: Any, o: dict[str, Any]) -> None:
    """``dataset_name`` found here (a path beside the config, or a Hub dataset in the HF cache) becomes ``--data``:
    ``max_length`` then truncates (``--max-seq-len``) instead of being every sample's length, and ``packing`` /
    ``packing_strategy`` batch as TRL does. A dataset not found here is planned at ``max_length``, with a warning."""
    from qplan.planner.data.sources import hub_dataset_folder

    name = r.get("dataset_name")
    if not name:
        return
    name = str(name)
    local = Path(name) if Path(name).is_absolute() else r.base / name
    if local.exists():
        source = str(local)
    elif hub_dataset_folder(name) is not None:
        source = name
    else:
        r.warnings.append(note("data", f"trl config: dataset_name {shown(name)} is neither beside the config nor a Hub "
                          "dataset in the "
                          f"HF cache: every sample is planned at max_length ({o['seq_len']}); pass --data (or download "
                          "it with datasets.load_dataset) to plan the real lengths"))
        return
    if r.get("dataset_text_field", "text") != "text":
        raise QPlanError(f"trl config: dataset_text_field {shown(r.get('dataset_text_field'))} is not planned with the "
                         "dataset (qplan reads the text field 'text', messages or prompt/completion)")
    if r.get("dataset_train_split", "train") != "train":
        raise QPlanError(f"trl config: dataset_train_split {shown(r.get('dataset_train_split'))} is not planned (qplan "
                         "reads the train split's files)")
    o["data"] = source
    o["max_seq_len"] = o.pop("seq_len")
    if r.get("packing", False):
        strategy = str(r.get("packing_strategy", "bfd"))
        if strategy not in ("bfd", "wrapped"):
            raise QPlanError(f"trl config: packing_strategy {shown(strategy)} is not planned (bfd or wrapped)")
        o["batching"], o["packing_strategy"] = "packing", strategy


#: axolotl dataset types qplan formats (``planner.data.axolotl``)
AXOLOTL_TYPES = ("alpaca", "completion", "chat_template")
#: keys of an axolotl ``datasets:`` entry that do not change the samples' lengths (or are read here)
AXOLOTL_DS_KEYS = {"path", "type", "split", "ds_type", "train_on_eos", "train_on_eot", "field_messages",
                   "message_property_mappings", "roles_to_train", "chat_template", "field", "shards", "revision"}


def _axolotl_local(path: str, base: Path) -> Path | None:
    """A dataset ``path`` on this machine: as axolotl reads it (from the working directory), else beside the config."""
    for p in (Path(path), base / path):
        if p.exists():
            return p
    return None


def axolotl_data(r: Any, o: dict[str, Any]) -> None:
    """axolotl's batches: its collator pads each batch to a multiple of ``pad_to_multiple_of`` (64 unless set;
    ``pad_to_sequence_len: true`` — the default with ``sample_packing`` — pads to ``sequence_len`` rounded up to
    it; ``false``: to the longest) (axolotl 0.19 ``core/builders/causal.py``). The one dataset of ``datasets:``,
    found here (the working directory, beside the config, or a Hub dataset in the HF cache) and of a type qplan
    formats, becomes ``--data``; otherwise the plan is its bound: every batch at ``sequence_len`` rounded up."""
    from qplan.planner.data.sources import hub_dataset_folder

    seq = o["seq_len"]
    for key in ("sample_packing", "pad_to_sequence_len"):
        if r.get(key) not in (None, True, False):
            raise QPlanError(f"axolotl config: {key} must be true or false, got {shown(r.get(key))}")
    packing = bool(r.get("sample_packing", False))
    pad_seq = r.get("pad_to_sequence_len", True if packing else None)
    multiple = r.typed("pad_to_multiple_of", int, PAD_MULTIPLE)
    if multiple < 1:
        raise QPlanError(f"axolotl config: pad_to_multiple_of must be at least 1, got {multiple}")
    strategy = str(r.get("excess_length_strategy") or "drop").lower()  # axolotl lowercases it
    if strategy not in ("drop", "truncate", "raise"):
        raise QPlanError(f"axolotl config: excess_length_strategy {shown(r.get('excess_length_strategy'))} is not "
                         "planned (drop, truncate or raise)")
    pad = 1 if pad_seq is False else round_up(seq, multiple) if pad_seq else multiple  # 1: to the longest
    bound = round_up(seq, pad)
    datasets = r.get("datasets")
    why = None
    entry: dict[str, Any] = {}
    if not datasets:
        why = "no datasets"
    elif not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise QPlanError(f"axolotl config: datasets must be a list of mappings, got {shown(datasets)}")
    elif len(datasets) > 1:
        why = f"{len(datasets)} datasets (qplan reads one)"
    else:
        entry = datasets[0]
        typ, keys = entry.get("type"), set(entry) - AXOLOTL_DS_KEYS
        maps = entry.get("message_property_mappings")
        template = entry.get("chat_template", r.get("chat_template")) or "tokenizer_default"
        if typ not in AXOLOTL_TYPES:
            why = f"dataset type {shown(typ)} (qplan formats {', '.join(AXOLOTL_TYPES)})"
        elif keys:
            why = f"dataset keys {', '.join(sorted(map(str, keys)))}"
        elif entry.get("field", "text") != "text" or entry.get("field_messages", "messages") not in ("messages", "conversations"):
            why = "a field other than text / messages / conversations"
        elif maps and maps not in ({"role": "role", "content": "content"}, {"role": "from", "content": "value"}):
            why = f"message_property_mappings {shown(maps)}"
        elif entry.get("roles_to_train", ["assistant"]) != ["assistant"]:
            why = f"roles_to_train {shown(entry.get('roles_to_train'))}"
        elif typ == "chat_template" and not str(template).startswith("tokenizer_default"):
            why = f"chat_template {shown(template)} (qplan renders the tokenizer's own template)"
        elif str(entry.get("split", "train")) != "train":
            why = f"split {shown(entry.get('split'))} (qplan reads the train split's files)"
        elif not isinstance(entry.get("path"), str) or not entry["path"]:
            why = "a dataset without a path"
    source = None
    if why is None:
        local = _axolotl_local(entry["path"], r.base)
        source = str(local) if local is not None else entry["path"] if hub_dataset_folder(entry["path"]) else None
        if source is None:
            why = f"dataset {shown(entry['path'])} is neither here nor a Hub dataset in the HF cache"
    if source is None:
        o["seq_len"] = bound
        if why != "no datasets":
            r.warnings.append(note("data", f"axolotl config: {why}: every batch is planned at its bound, sequence_len {seq}"
                              + (f" padded to {bound}" if bound != seq else "") + "; pass --data (with --data-format "
                              "axolotl:TYPE) to plan the real lengths"))
        return
    if packing and r.get("train_on_inputs"):
        r.warnings.append(note("data", "axolotl config: train_on_inputs with sample_packing keeps the samples whose "
                          "prompt alone is "
                          "trained; qplan drops them as it does without train_on_inputs (the token counts may be low)"))
    o["data"] = source
    o["data_format"] = f"axolotl:{entry['type']}"
    o["max_seq_len"] = o.pop("seq_len")
    o["long_samples"] = strategy
    o["pad_to_multiple_of"] = pad
    o["batching"] = "packing" if packing else "group_by_length" if r.get("group_by_length") else "padding"
    if packing:
        r.warnings.append(note("data", "axolotl config: sample_packing's packs are counted by best-fit decreasing "
                          "(TRL's bfd), not "
                          "axolotl's multipack sampler: the planned shape (micro_batch_size × sequence_len) is its "
                          "own, the number of packs (the time) may differ slightly"))


def llamafactory_bound(r: Any, o: dict[str, Any]) -> None:
    """LLaMA-Factory's batches: samples cut to ``cutoff_len``, each batch padded to its longest rounded up to a
    multiple of 8 when training (llamafactory 0.9.5 ``train/sft/workflow.py``: ``pad_to_multiple_of=8 if
    training_args.do_train``). Its ``dataset:`` (names in ``dataset_info.json``, formatted by LLaMA-Factory's own
    templates) is not read: the plan is the bound, ``cutoff_len`` rounded up, with a warning that says so."""
    seq = o["seq_len"]
    bound = round_up(seq, 8) if r.get("do_train", False) else seq
    o["seq_len"] = bound
    if r.get("dataset"):
        r.warnings.append(note("data", f"llamafactory config: dataset {shown(r.get('dataset'))} is not read (LLaMA-Factory's "
                          f"dataset_info.json and templates are not modelled): every batch is planned at its bound, "
                          f"cutoff_len {seq}" + (f" padded to a multiple of 8: {bound}" if bound != seq else "")
                          + "; pass --data to plan the real lengths"))
