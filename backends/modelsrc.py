"""The base model of a run: a local model folder, or one built from the plan's config.

``--random-init`` builds the model of ``plan["model"]["config"]`` with random weights
(``torch.manual_seed(seed)``, transformers' own initialisation), saves it with
``save_pretrained`` (safetensors, float32) together with a byte-level tokenizer, and then the
backend loads that folder through its normal path — so quantization, dtype casts and k-bit
preparation happen exactly as for a downloaded model. Nothing is fetched from the Hub.

The byte-level tokenizer maps each UTF-8 byte ``b`` to id ``b + 3`` after three special tokens
(``<pad>`` 0, ``<s>`` 1, ``</s>`` 2): 259 ids, all below any real vocabulary size. It is a
``tokenizers`` BPE with the 256 byte symbols and no merges, saved as a
``PreTrainedTokenizerFast``, so every backend reads it with ``AutoTokenizer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError

SPECIALS = ("<pad>", "<s>", "</s>")
BYTE_VOCAB = len(SPECIALS) + 256


def check_model_dir(path: str | Path) -> Path:
    """A ``--model-dir`` must be a folder with a config.json."""
    from qplan.planner.files import safe_exists

    p = Path(path)
    if not safe_exists(p) or not p.is_dir():
        raise QPlanError(f"--model-dir {path} is not a directory")
    if not (p / "config.json").is_file():
        raise QPlanError(f"--model-dir {path} has no config.json: point it at a Hugging Face model folder")
    return p


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def byte_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` with ids ``0..258``: three specials, then bytes 0..255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = len(SPECIALS) + b
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=1 << 30)


def build_random_model_dir(config: dict[str, Any], folder: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised causal LM of ``config`` (float32) and a byte tokenizer to ``folder``.

    Deterministic: the same config and seed give the same weights (CPU initialisation).
    """
    import torch

    from qplan.hf import model_from_config

    vocab = int(config.get("vocab_size") or 0)
    if vocab < BYTE_VOCAB:
        raise QPlanError(f"--random-init needs vocab_size >= {BYTE_VOCAB} for its byte-level tokenizer; "
                         f"this config has {vocab}: use --model-dir with a tokenizer")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = model_from_config(config, dtype="float32", device="cpu")
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    del model
    return folder
