#!/usr/bin/env python3
"""Build a model folder from a qplan spec with random weights: config, bf16 safetensors, tokenizer.

    python bench/gpu/models.py --model llama-3.1-8b --dest /tmp/qplan-models/llama-3.1-8b [--device cuda]

The folder is what ``qplan run PLAN --model-dir DIR`` loads like a downloaded checkpoint
(``from_pretrained``, with the plan's BitsAndBytesConfig for nf4, so quantization happens on
load exactly as in a real QLoRA run). Memory does not depend on the values of the weights, so
random ones measure the same as real ones; no network is needed.

* weights: ``AutoModelForCausalLM.from_config`` in bfloat16, built directly on ``--device``
  (an 8B model initialises in seconds on a GPU, minutes on a CPU), saved as safetensors;
* tokenizer: a byte-level BPE with no merges (every UTF-8 byte is one token, so any text
  tokenizes) padded with unused tokens to exactly the config's ``vocab_size``, with the
  config's bos/eos ids; a trainer that compares ``len(tokenizer)`` with the embedding never
  resizes it;
* ``qplan-random-model.json``: spec name, seed, dtype, parameter count and bytes.

The folder is written as ``DEST.partial`` and renamed when complete, so an interrupted build
is never mistaken for a model. ``--tiny`` shrinks the config (2 layers, hidden 64, vocab 512)
for the CPU smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

MARKER = "qplan-random-model.json"

#: --tiny: the architecture stays, the sizes shrink (2 layers, GQA 4:2, vocab 512).
TINY_OVERRIDES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                  "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2, "max_window_layers": 2}


def tiny_config(config: dict[str, Any]) -> dict[str, Any]:
    """A 2-layer version of ``config`` with the same model_type and attention layout."""
    cfg = dict(config)
    for key, value in TINY_OVERRIDES.items():
        if key in cfg or key in ("head_dim", "num_key_value_heads"):
            cfg[key] = value
    cfg["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    for key in ("layer_types", "pad_token_id"):  # per-layer lists must match the new depth
        cfg.pop(key, None)
    return cfg


def _first_id(value) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def build_tokenizer(vocab_size: int, bos_id: int | None, eos_id: int | None, extra: tuple[str, ...] = ()):
    """Byte-level BPE, no merges, exactly ``vocab_size`` tokens, specials at the config's ids.

    ``extra``: token strings a family's tokenizer class adds when it loads (transformers 5 maps
    a qwen2 folder to Qwen2Tokenizer, which adds ``<|endoftext|>``); they get ids inside the
    vocabulary so loading adds nothing.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    specials: dict[int, str] = {}
    bos_id = bos_id if bos_id is not None and bos_id < vocab_size else None
    eos_id = eos_id if eos_id is not None and eos_id < vocab_size else None
    if bos_id is not None:
        specials[bos_id] = "<|qplan_bos|>"
    if eos_id is not None and eos_id not in specials:
        specials[eos_id] = "<|qplan_eos|>"
    free = (i for i in range(vocab_size) if i not in specials)
    vocab: dict[str, int] = {}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = next(free)
    pad_id = next(free)
    specials[pad_id] = "<|qplan_pad|>"
    for i, tok in specials.items():
        vocab[tok] = i
    for tok in extra:
        if tok not in vocab:
            vocab[tok] = next(free)
    for i in free:
        vocab[f"<|qplan_unused_{i}|>"] = i
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    kwargs = {"pad_token": "<|qplan_pad|>"}
    if bos_id is not None:
        kwargs["bos_token"] = specials[bos_id]
    if eos_id is not None:
        kwargs["eos_token"] = specials[eos_id]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 20, **kwargs)
    return fast


def save_tokenizer(folder: Path, config: dict[str, Any]) -> None:
    """Save the tokenizer and check that AutoTokenizer loads it back with ``vocab_size`` tokens."""
    from transformers import AutoTokenizer

    vocab_size = int(config["vocab_size"])
    extra: tuple[str, ...] = ()
    for _ in range(3):
        tok = build_tokenizer(vocab_size, _first_id(config.get("bos_token_id")),
                              _first_id(config.get("eos_token_id")), extra)
        tok.save_pretrained(folder)
        loaded = AutoTokenizer.from_pretrained(folder)
        got = loaded.get_vocab()
        added = tuple(t for t, i in got.items() if i >= vocab_size)
        if len(loaded) == vocab_size and not added:
            return
        extra = extra + added
    raise RuntimeError(f"tokenizer in {folder} loads with {len(loaded)} tokens, not {vocab_size}")


def is_built(dest: Path) -> bool:
    return (dest / MARKER).is_file() and (dest / "config.json").is_file()


def build_model_dir(config: dict[str, Any], dest: Path, *, name: str, device: str = "cpu",
                    seed: int = 0, dtype: str = "bfloat16", force: bool = False) -> dict[str, Any]:
    """Write config + random bf16 weights + tokenizer to ``dest``; return the marker's content."""
    import torch
    import transformers

    from qplan.hf import model_from_config

    dest = Path(dest)
    if is_built(dest) and not force:
        return json.loads((dest / MARKER).read_text())
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.time()
    torch.manual_seed(seed)
    model = model_from_config(config, dtype=dtype, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(partial, safe_serialization=True, max_shard_size="5GB")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    save_tokenizer(partial, config)
    weight_bytes = sum(f.stat().st_size for f in partial.glob("*.safetensors"))
    marker = {"spec": name, "random_init": True, "seed": seed, "dtype": dtype, "params": n_params,
              "safetensors_bytes": weight_bytes, "device_built_on": device,
              "transformers": transformers.__version__, "torch": torch.__version__,
              "seconds": round(time.time() - t0, 1), "tokenizer": "byte-level BPE, no merges, padded to vocab_size"}
    (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(partial, dest)
    return marker


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build a random-weight model folder from a qplan spec.")
    ap.add_argument("--model", required=True, help="spec name (qplan models) or a config.json")
    ap.add_argument("--dest", required=True)
    ap.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="shrink the config (CPU smoke test)")
    ap.add_argument("--force", action="store_true", help="rebuild even if DEST is complete")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qplan.planner.model.catalog import load_spec

    config = load_spec(args.model).config
    if args.tiny:
        config = tiny_config(config)
    marker = build_model_dir(config, Path(args.dest), name=args.model, device=args.device, seed=args.seed,
                             force=args.force)
    print(json.dumps(marker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
