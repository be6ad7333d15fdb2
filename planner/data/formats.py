"""Records -> token counts, formatted as TRL's ``SFTTrainer`` prepares them (trl 1.x ``_prepare_dataset``).

A dataset has one format, found from its first record and required of every record (a mixed dataset is one
line naming the first row that differs):

* ``text`` — language modelling: the EOS token appended unless the text ends with it, then tokenized
  (the tokenizer's special tokens, e.g. BOS, included).
* ``messages`` — a conversation (``[{role, content}]``; ShareGPT's ``conversations`` of ``{from, value}`` are
  converted to it as TRL's ``maybe_convert_to_chatml`` does: keys renamed, roles such as ``human``/``gpt`` kept
  as they are): the model's chat template, tokenized. No EOS is
  added (the template ends turns itself).
* ``prompt-completion`` — plain strings: ``prompt + completion`` (+ EOS unless the completion ends with it),
  tokenized; conversations: the chat template over ``prompt + completion``. The prompt's own token count is
  kept: TRL trains on the completion only (``completion_only_loss`` is on for such data) and drops a sample
  whose prompt alone fills ``max_length`` (no token left to learn from).
* ``instruction`` — qplan's own ``instruction``/``input``/``response`` records (``qplan run``'s data format):
  the template of ``backends/data.py`` as text, then as ``text``.
* ``preference`` — ``prompt``/``chosen``/``rejected`` (DPO's data, ``--objective dpo``), as TRL 1.16's
  ``DPOTrainer._prepare_dataset`` tokenizes them: plain strings get the EOS appended to ``chosen`` and ``rejected``
  (unless they end with it), then ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` are tokenized
  (conversations: the chat template, the prompt with ``add_generation_prompt``); the prompt's share is the shorter
  common prefix. A pair's length is its longer row (``DataCollatorForPreference`` pads the chosen and the rejected
  rows of a batch together), and a pair whose prompt alone fills ``max_length`` is dropped, as TRL drops it. An
  implicit prompt (``chosen``/``rejected`` only: TRL's ``extract_prompt``) is not read yet.
* ``unpaired`` — ``prompt``/``completion``/``label`` (KTO's data, ``--objective kto``), tokenized as
  ``prompt-completion`` is (TRL 1.16's ``KTOTrainer._prepare_dataset`` does the same: EOS on a plain completion, the
  prompt's share the common prefix, a row dropped when its prompt alone fills ``max_length``); ``label`` must be a
  boolean (desirable or not).

Truncation is TRL's ``keep_start``: the first ``max_length`` tokens (not when packing: packing cuts instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qplan.planner.errors import QPlanError

FORMATS = ("auto", "text", "messages", "prompt-completion", "instruction", "preference", "unpaired",
           "axolotl:alpaca", "axolotl:completion", "axolotl:chat_template")  # the axolotl types: planner.data.axolotl
#: what happens to a sample over --max-seq-len (auto: TRL truncates, axolotl drops)
LONG_SAMPLES = ("auto", "truncate", "drop", "raise")
#: qplan run's instruction template (backends/data.py keeps the same strings; a test checks they agree)
TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n{response}"
TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}"
#: records tokenized per call of the tokenizer
BATCH = 8192


def detect(rec: dict[str, Any]) -> str:
    """The format of one record (see the module docstring)."""
    if "chosen" in rec and "rejected" in rec:
        if "prompt" not in rec:
            raise QPlanError("a preference record without a prompt field (an implicit prompt, which TRL's "
                             "extract_prompt splits off) is not read yet: give prompt, chosen and rejected")
        return "preference"
    if "messages" in rec or "conversations" in rec:
        return "messages"
    if "prompt" in rec and "completion" in rec and "label" in rec:
        return "unpaired"
    if "prompt" in rec and "completion" in rec:
        return "prompt-completion"
    if "text" in rec:
        return "text"
    if "instruction" in rec and "response" in rec:
        return "instruction"
    keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
    raise QPlanError(f"no training field (text, messages, conversations, prompt/completion, instruction/response); "
                     f"its fields: {keys}")


def messages_list(value: Any, where: str, keep_extra: bool = False) -> list[dict[str, Any]]:
    """A conversation's messages, ShareGPT ``from``/``value`` turns renamed to ``role``/``content`` (roles kept as
    they are). ``keep_extra``: a turn's other keys stay, and one that has a ``role`` is left as it is (axolotl's
    ``message_property_mappings``); else only the two renamed keys (TRL's ``maybe_convert_to_chatml``)."""
    if not isinstance(value, list) or not value:
        raise QPlanError(f"{where}: expected a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise QPlanError(f"{where}: a message is not an object")
        if "from" in m and "value" in m and not (keep_extra and "role" in m):  # ShareGPT
            extra = {k: v for k, v in m.items() if k not in ("from", "value")} if keep_extra else {}
            m = {"role": m["from"], "content": m["value"], **extra}
        if not isinstance(m.get("role"), str) or "content" not in m:
            raise QPlanError(f"{where}: a message needs 'role' and 'content'")
        out.append(m)
    return out


def _string(rec: dict[str, Any], key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise QPlanError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


class Formatter:
    """Token counts of records with one tokenizer (a transformers tokenizer: ``__call__``, ``apply_chat_template``,
    ``eos_token``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.eos = tokenizer.eos_token or ""

    def ids(self, texts: list[str], keep: bool) -> list[Any]:
        out: list[Any] = []
        fast = None if keep else self._lengths_only()
        for i in range(0, len(texts), BATCH):
            if fast is not None:  # the Rust tokenizer's lengths, no Python list of ids made (2x faster)
                out.extend(len(e) for e in fast(texts[i:i + BATCH], add_special_tokens=True))
                continue
            enc = self.tok(texts[i:i + BATCH])["input_ids"]
            out.extend(enc if keep else (len(ids) for ids in enc))
        return out

    def _lengths_only(self) -> Any:
        """The backend's ``encode_batch_fast`` when calling it is what ``tokenizer(texts)`` does: a fast tokenizer
        whose backend has no truncation or padding of its own (``__call__`` turns those off per call)."""
        backend = getattr(self.tok, "_tokenizer", None)
        fast = getattr(backend, "encode_batch_fast", None)
        if fast is None or getattr(backend, "truncation", None) is not None or getattr(backend, "padding", None) is not None:
            return None
        return fast

    def chat(self, conversation: list[dict[str, Any]], where: str, keep: bool, **kw: Any) -> Any:
        if not getattr(self.tok, "chat_template", None):
            raise QPlanError(f"{where}: conversational data needs a chat template, and this tokenizer has none "
                             "(give --tokenizer with one)")
        try:
            ids = self.tok.apply_chat_template(conversation, tokenize=True, return_dict=True, **kw)["input_ids"]
        except Exception as exc:  # a template raising on this conversation (jinja's raise_exception)
            raise QPlanError(f"{where}: the chat template refuses it: {str(exc)[:120]}") from exc
        return list(ids) if keep else len(ids)

    def _text(self, t: str) -> str:
        return t if not self.eos or t.endswith(self.eos) else t + self.eos

    def lengths(self, rows: Sequence[dict[str, Any]], fmt: str, where: str) -> tuple[list[int], list[int] | None]:
        """Per record: the tokens of the training sequence, and (prompt-completion) the prompt's tokens."""
        return self._format(rows, fmt, where, keep=False)

    def sequences(self, rows: Sequence[dict[str, Any]], fmt: str, where: str) -> tuple[list[list[int]], list[int] | None]:
        """Per record: the token ids of the training sequence, and (prompt-completion) the prompt's tokens."""
        return self._format(rows, fmt, where, keep=True)

    def _format(self, rows: Sequence[dict[str, Any]], fmt: str, where: str, keep: bool) -> tuple[list[Any], list[int] | None]:
        if fmt == "auto":
            fmt = detect(rows[0]) if rows else "text"
        for i, rec in enumerate(rows, 1):
            if detect_or_none(rec) != fmt:
                raise QPlanError(f"{where} row {i}: not a {fmt} record like row 1 (mixed formats: "
                                 f"{detect_or_none(rec) or 'no training field'})")
        if fmt == "text":
            return self.ids([self._text(_string(r, "text", f"{where} row {i}")) for i, r in enumerate(rows, 1)],
                             keep), None
        if fmt == "instruction":
            texts = []
            for i, r in enumerate(rows, 1):
                w = f"{where} row {i}"
                fields = {k: _string(r, k, w) for k in ("instruction", "response")}
                if r.get("input"):
                    texts.append(TEMPLATE_WITH_INPUT.format(input=_string(r, "input", w), **fields))
                else:
                    texts.append(TEMPLATE.format(**fields))
            return self.ids([self._text(t) for t in texts], keep), None
        if fmt == "messages":
            return [self.chat(messages_list(r.get("messages", r.get("conversations")), f"{where} row {i}"),
                               f"{where} row {i}", keep, **_template_kwargs(r, f"{where} row {i}"))
                    for i, r in enumerate(rows, 1)], None
        if fmt == "preference":
            return self._preference(rows, where, keep)
        if fmt == "unpaired":  # KTO's rows: tokenized as prompt-completion (a label besides)
            for i, r in enumerate(rows, 1):
                if not isinstance(r.get("label"), bool):
                    raise QPlanError(f"{where} row {i}: field 'label' must be true or false (desirable or not), got "
                                     f"{type(r.get('label')).__name__}")
        # prompt-completion: the prompt's share is where the tokenized prompt and prompt+completion diverge (TRL's
        # common_prefix_length: a BPE merge across the boundary, or a template rendering the prompt alone
        # differently, makes it shorter than the prompt's own tokens)
        full: list[Any] = []
        prompt: list[int] = []
        texts_p, texts_pc, plain = [], [], []
        for i, r in enumerate(rows, 1):
            w = f"{where} row {i}"
            if isinstance(r.get("prompt"), list):
                pr, c = messages_list(r["prompt"], w), messages_list(r["completion"], w)
                kw = _template_kwargs(r, w)
                p_ids = self.chat(pr, w, True, add_generation_prompt=True, **kw)
                f_ids = self.chat(pr + c, w, True, **kw)
                prompt.append(common_prefix(p_ids, f_ids))
                full.append(f_ids if keep else len(f_ids))
            else:
                texts_p.append(_string(r, "prompt", w))
                texts_pc.append(texts_p[-1] + self._text(_string(r, "completion", w)))
                plain.append(len(full))
                full.append(0)
                prompt.append(0)
        if plain:
            for j, p_ids, f_ids in zip(plain, self.ids(texts_p, True), self.ids(texts_pc, True), strict=True):
                prompt[j], full[j] = common_prefix(p_ids, f_ids), (f_ids if keep else len(f_ids))
        return full, prompt


    def _preference(self, rows: Sequence[dict[str, Any]], where: str, keep: bool) -> tuple[list[Any], list[int]]:
        """Per pair: its longer row (``prompt + chosen`` or ``prompt + rejected``; with ``keep`` that row's ids), and
        the prompt's share (the shorter of its common prefixes with the two rows): see the module docstring."""
        full: list[Any] = []
        prompt: list[int] = []
        for i, r in enumerate(rows, 1):
            w = f"{where} row {i}"
            if isinstance(r.get("prompt"), list):
                kw = _template_kwargs(r, w)
                pr = messages_list(r["prompt"], w)
                p_ids = self.chat(pr, w, True, add_generation_prompt=True, **kw)
                pc, prj = (self.chat(pr + messages_list(r[k], w), w, True, **kw) for k in ("chosen", "rejected"))
            else:
                text = _string(r, "prompt", w)
                p_ids, pc, prj = self.ids([text, text + self._text(_string(r, "chosen", w)),
                                           text + self._text(_string(r, "rejected", w))], True)
            prompt.append(min(common_prefix(p_ids, pc), common_prefix(p_ids, prj)))
            longer = pc if len(pc) >= len(prj) else prj
            full.append(list(longer) if keep else len(longer))
        return full, prompt


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def record_tools(rec: dict[str, Any], where: str) -> Any:
    """A record's ``tools``: a list, or JSON text of one (TRL and axolotl both read either)."""
    import json

    tools = rec.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as exc:
            raise QPlanError(f"{where}: 'tools' is not JSON") from exc
    return tools


def _template_kwargs(rec: dict[str, Any], where: str) -> dict[str, Any]:
    """What TRL passes to the chat template from a record: its ``tools`` (JSON text or a list) and its
    ``chat_template_kwargs``."""

    kw: dict[str, Any] = {}
    tools = record_tools(rec, where)
    if tools is not None:
        kw["tools"] = tools
    extra = rec.get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise QPlanError(f"{where}: 'chat_template_kwargs' must be an object")
        kw.update({str(k): v for k, v in extra.items() if k not in ("tokenize", "return_dict", "conversation")})
    return kw


def detect_or_none(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return None
    try:
        return detect(rec)
    except QPlanError:
        return None
