"""Oracle: axolotl's own dataset preparation (axolotl 0.19.0, installed --no-deps by scripts/setup-oracles.sh).

Run in a subprocess with axolotl on PYTHONPATH (so qplan's environment never imports it):
``python axolotl_prepare.py JOBS.json`` (a list of jobs) prints a JSON list, per job ``{"before_filter": [...],
"lengths": [...]}`` (or ``"error"``): the token count of every sample axolotl's ``get_dataset_wrapper`` makes
from the records (its dataset-type dispatch and prompt strategies), then after its
``handle_long_seq_in_dataset`` and, with ``sample_packing``, its ``process_datasets_for_packing`` (the drop of
samples with no trainable token). Job keys: ``tokenizer``, ``records``, ``type``, ``sequence_len``,
``excess_length_strategy``, ``sample_packing``, ``train_on_inputs``, ``dataset`` (more keys of the datasets entry).
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    toks = {}
    out = []
    for job in json.load(open(sys.argv[1])):
        if job["tokenizer"] not in toks:
            toks[job["tokenizer"]] = AutoTokenizer.from_pretrained(job["tokenizer"])
        out.append(run(job, toks[job["tokenizer"]]))
    print(json.dumps(out))


def run(job: dict, tok) -> dict:
    import datasets
    from axolotl.utils.data.utils import handle_long_seq_in_dataset
    from axolotl.utils.data.wrappers import get_dataset_wrapper
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.trainer import process_datasets_for_packing

    cfg = DictDefault({"sequence_len": job["sequence_len"], "train_on_inputs": job.get("train_on_inputs", False),
                       "excess_length_strategy": job.get("excess_length_strategy"),
                       "sample_packing": job.get("sample_packing", False), "dataset_num_proc": 1,
                       "is_preprocess": False})
    ds_cfg = DictDefault({"path": "data.jsonl", "type": job["type"], **job.get("dataset", {})})
    d = tempfile.mkdtemp()  # read as axolotl reads a local JSONL (``ds_type: json``): one schema for all rows, a
    path = os.path.join(d, "data.jsonl")  # field some rows lack is None in the others (kept: the arrow maps it)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in job["records"])
    raw = datasets.load_dataset("json", data_files=path, split="train", cache_dir=os.path.join(d, "cache"))
    wrapped, _ = get_dataset_wrapper(ds_cfg, tok, cfg, job["type"].split(":")[0], raw)
    before = [len(r["input_ids"]) for r in wrapped]
    try:
        out = handle_long_seq_in_dataset(wrapped, job["sequence_len"], cfg)
        if cfg.sample_packing:
            out, _ = process_datasets_for_packing(cfg, out, None)
    except ValueError as exc:  # excess_length_strategy: raise, or nothing left to train on
        return {"before_filter": before, "error": str(exc)}
    return {"before_filter": before, "lengths": [len(r["input_ids"]) for r in out]}


if __name__ == "__main__":
    main()
