"""Reading a dataset's records: JSONL, JSON, CSV/TSV, Parquet, Arrow, a ``datasets`` ``save_to_disk`` folder, a
folder of data files, or a Hub dataset id whose files are in the Hugging Face cache (offline).

Every read is bounded (``MAX_DATA_BYTES``, regular files only: ``files.read_limited`` for the text formats, a
size and file-type check before pyarrow opens a binary one). A record that is not an object, a line that is not
JSON or not UTF-8, an empty file: one line naming the file and the row (1-based).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.files import NAMES_ONLY, read_limited, safe_exists

#: the most of a dataset qplan reads (a fine-tuning set, not a pre-training corpus)
MAX_DATA_BYTES = 4 << 30
TEXT_KINDS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
ARROW_KINDS = (".parquet", ".arrow")


def _text(path: Path) -> str:
    raw = read_limited(path, "data file", MAX_DATA_BYTES)
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark is not part of the first record
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise QPlanError(f"{path}:{line}: not UTF-8 text (byte {exc.start:,})") from exc


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, and an int of over 4,300 digits
            raise QPlanError(f"{path}:{i}: not JSON ({str(exc)[:80]})") from exc
        rows.append(_record(rec, f"{path}:{i}"))
    return rows


def _json(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(_text(path))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and an int of over 4,300 digits
        raise QPlanError(f"{path}: not JSON ({str(exc)[:80]})") from exc
    if not isinstance(doc, list):
        raise QPlanError(f"{path}: expected a JSON list of records (or use JSONL, one record per line)")
    return [_record(rec, f"{path}: record {i}") for i, rec in enumerate(doc, 1)]


def _csv(path: Path) -> list[dict[str, Any]]:
    text = _text(path)
    csv.field_size_limit(MAX_DATA_BYTES)
    try:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        return [dict(r) for r in reader]
    except csv.Error as exc:
        raise QPlanError(f"{path}:{reader.line_num}: not CSV ({str(exc)[:80]})") from exc


def _binary_file(path: Path) -> None:
    """The checks ``read_limited`` makes, for a file pyarrow reads itself."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise QPlanError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise QPlanError(f"data file {path} is not a regular file (a pipe, device or socket): give a file")
    if st.st_size > MAX_DATA_BYTES:
        raise QPlanError(f"data file {path} is over {MAX_DATA_BYTES >> 30} GiB ({st.st_size:,} bytes)")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as exc:  # pragma: no cover - pyarrow comes with the data extra
        raise QPlanError("Parquet and Arrow data need pyarrow: pip install 'qplan[data]'") from exc
    return pyarrow


def _arrow_table(path: Path) -> Any:
    pa = _pyarrow()
    _binary_file(path)
    try:
        if path.suffix.lower() == ".parquet":
            return pa.parquet.read_table(path)
        with open(path, "rb") as f:
            head = f.read(6)
        reader = pa.ipc.open_file if head == b"ARROW1" else pa.ipc.open_stream  # datasets writes streams
        return reader(path).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise QPlanError(f"data file {path}: not {path.suffix[1:]} ({str(exc)[:80]})") from exc


def _saved_dataset(folder: Path) -> list[dict[str, Any]]:
    """A ``Dataset.save_to_disk`` folder (``state.json`` lists its Arrow files), or a ``DatasetDict``'s (its train
    split)."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads(read_limited(folder / "dataset_dict.json", "dataset_dict.json")).get("splits") or []
            splits = [str(x) for x in splits]
        except (ValueError, RecursionError, AttributeError, TypeError) as exc:
            raise QPlanError(f"{folder}/dataset_dict.json is not a datasets DatasetDict file") from exc
        if "train" not in splits:
            raise QPlanError(f"{folder} is a DatasetDict without a train split (splits: {', '.join(map(str, splits))})")
        return _saved_dataset(folder / "train")
    if not (folder / "state.json").is_file():
        return _data_files(folder)
    try:
        state = json.loads(read_limited(folder / "state.json", "state.json"))
        files = [folder / Path(str(f["filename"])).name for f in state["_data_files"]]
    except (ValueError, RecursionError, KeyError, TypeError) as exc:
        raise QPlanError(f"{folder}/state.json is not a datasets state file") from exc
    rows: list[dict[str, Any]] = []
    for f in files:
        rows.extend(_arrow_table(f).to_pylist())
    return rows


def _data_files(folder: Path) -> list[dict[str, Any]]:
    """A folder of data files (a Hub dataset's snapshot: ``data/train-00000-of-00001.parquet``, ...): the train
    split's files — a file or folder named ``train`` or ``train-…``/``train_…``/``train.…`` — or, when there are
    none, every data file; in name order."""
    kinds = TEXT_KINDS + ARROW_KINDS
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in kinds
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    train = [f for f in files if any(re.match(r"train([-_.]|$)", part.lower()) for part in f.relative_to(folder).parts)]
    if not files:
        raise QPlanError(f"{folder} holds no data file (.jsonl, .json, .csv, .tsv, .parquet, .arrow) and is not a "
                         "datasets save_to_disk folder")
    rows: list[dict[str, Any]] = []
    for f in train or files:
        rows.extend(_file(f))
    return rows


def hub_dataset_folder(dataset_id: str) -> Path | None:
    """The newest snapshot of a Hub dataset in the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else ``~/.cache/huggingface/hub``), or None: offline, nothing is downloaded."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", dataset_id) or ".." in dataset_id:
        return None
    hub = os.environ.get("HF_HUB_CACHE") or str(Path(os.environ.get("HF_HOME") or Path.home() / ".cache" /
                                                     "huggingface") / "hub")
    snaps = Path(hub) / ("datasets--" + dataset_id.replace("/", "--")) / "snapshots"
    found = sorted((d for d in snaps.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime) if snaps.is_dir() else []
    return found[-1] if found else None


def resolve_source(source: str | Path) -> Path:
    """A path as given, or a Hub dataset id (``ORG/NAME``) found in the HF cache; inside ``files.names_only()``
    (``qplan serve``) only the latter, and the same answer whether a path of that name exists or not."""
    if NAMES_ONLY.get():
        snap = hub_dataset_folder(str(source))
        if snap is None:
            raise QPlanError(f"data {str(source)[:60]!r}: a Hub dataset id (ORG/NAME) in the HF cache here, never a path")
        return snap
    p = Path(source)
    if safe_exists(p):
        return p
    snap = hub_dataset_folder(str(source))
    if snap is not None:
        return snap
    raise QPlanError(f"data {source} does not exist (a JSONL/JSON/CSV/Parquet/Arrow file, a datasets folder, or a Hub "
                     "dataset id in the HF cache: download it once with datasets.load_dataset)")


def _file(p: Path) -> list[dict[str, Any]]:
    kind = p.suffix.lower()
    if kind in (".jsonl", ".ndjson"):
        return _jsonl(p)
    if kind == ".json":
        return _json(p)
    if kind in (".csv", ".tsv"):
        return _csv(p)
    if kind in ARROW_KINDS:
        return _arrow_table(p).to_pylist()
    raise QPlanError(f"data {p}: unknown kind {kind or '(no extension)'!r}: give .jsonl, .json, .csv, .tsv, "
                     ".parquet, .arrow or a datasets save_to_disk folder")


def _record(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise QPlanError(f"{where}: expected an object (a record with text, messages or prompt/completion fields), "
                         f"got {type(rec).__name__}")
    return rec


def read_records(source: str | Path) -> list[dict[str, Any]]:
    """The records of ``source`` (``resolve_source``); one line if it cannot be read or holds none."""
    return read_resolved(resolve_source(source), source)


def read_resolved(p: Path, source: str | Path | None = None) -> list[dict[str, Any]]:
    """The records of ``p``, a file or folder ``resolve_source`` gave."""
    rows = _saved_dataset(p) if p.is_dir() else _file(p)
    if not rows:
        raise QPlanError(f"data {source or p} has no records")
    return rows
