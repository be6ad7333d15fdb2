"""Records -> samples as axolotl prepares them (axolotl 0.19.0), for ``--data-format axolotl:TYPE`` and the
``datasets:`` of an axolotl config.

Two steps, so the tokenizer runs once per dataset whatever ``sequence_len`` (``--max-seq-len``) is planned:

1. ``columns`` — per record, what the tokenizer gives (cached by ``planner.data.cache``):

   * ``axolotl:alpaca`` (``utils/data/wrappers.py`` ``_handle_alpaca_dataset`` → ``prompt_tokenizers.py``
     ``AlpacaPromptTokenizingStrategy`` with ``prompters.py`` ``AlpacaPrompter``, instruct style): the prompt
     ``system + "\\n\\n" + "### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n"``
     (the system sentence without "paired with an input" when ``input`` is empty) and the ``output`` are
     tokenized *separately* — ``prompt``/``response`` tokens, and whether the response's ids end with EOS or
     start with BOS.
   * ``axolotl:completion`` (``prompt_strategies/completion.py``): the ``text`` field's tokens, and whether they
     end with EOS.
   * ``axolotl:chat_template`` (``prompt_strategies/chat_template.py``, its defaults): the messages (``messages``,
     or ``conversations`` of ShareGPT ``from``/``value`` turns, as axolotl's ``message_property_mappings``
     would map them) with roles mapped as ``ChatTemplatePrompter`` maps them (``human`` → ``user``, ``gpt`` →
     ``assistant``), a record's ``system`` field prepended as a system turn (an empty one where another
     record has the field), its ``tools``, through the tokenizer's chat template (``chat_template:
     tokenizer_default``) — the sequence's tokens, and the tokens before its first answer (``roles_to_train:
     [assistant]``; none: nothing to train on).

2. ``samples`` — with ``sequence_len`` L, each record's sample(s), as ``PromptTokenizingStrategy._tokenize``
   builds them: every part truncated to its ``max_length`` (``truncation=True``), EOS appended to a part that
   does not end with it and is shorter than that, BOS stripped from the response. Alpaca: prompt (max L) +
   response (max L, so a sample can reach 2 L before the length filter). Completion: the text cut at 64 L,
   then split into chunks of L (a long text is several samples, none dropped for length). Chat template: the
   whole conversation, not truncated.

Then axolotl's length filter (``utils/data/utils.py`` ``handle_long_seq_in_dataset``, ``excess_length_strategy``:
``drop`` — the default — keeps ``min_sample_len`` (2) ≤ n ≤ L; ``truncate`` drops n < 2 and cuts to L; ``raise``
stops on the first n > L), and, with ``sample_packing``, its drop of samples with no trainable token
(``utils/trainer.py`` ``process_datasets_for_packing``; ``train_on_inputs: false``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from qplan.planner.data.formats import FORMATS as ALL_FORMATS
from qplan.planner.data.formats import messages_list, record_tools
from qplan.planner.errors import QPlanError

FORMATS = tuple(f for f in ALL_FORMATS if f.startswith("axolotl:"))
#: ``prompters.py`` ``AlpacaPrompter`` (instruct style): the system sentences and the turn formats
ALPACA_SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.")
ALPACA_SYSTEM_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.")
ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TURN_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
#: ``ChatTemplatePrompter``'s default role map
ROLES = {"human": "user", "user": "user", "assistant": "assistant", "gpt": "assistant", "system": "system", "tool": "tool"}
#: ``completion.py``: the text is cut at this many times ``sequence_len`` before it is split into chunks
COMPLETION_CAP = 64
#: axolotl's collator pads to a multiple of this unless told otherwise (``core/builders/causal.py``)
PAD_MULTIPLE = 64
#: ``filter_sequences_by_length``'s ``min_sequence_len`` (axolotl's ``min_sample_len``, unset)
MIN_SAMPLE_LEN = 2


def alpaca_prompt(rec: dict[str, Any], where: str) -> tuple[str, str]:
    """(prompt text, response text) of an Alpaca record (``instruction``, optional ``input``, ``output``)."""
    def text(key: str) -> str:
        v = rec.get(key)
        if v is None:
            raise QPlanError(f"{where}: no {key!r} field (axolotl's alpaca type reads instruction, input and output)")
        if not isinstance(v, str):
            raise QPlanError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
        return v

    instruction = text("instruction")
    output = text("output") if rec.get("output") is not None else ""  # axolotl: a missing output is an empty response
    inp = text("input") if rec.get("input") is not None else ""
    if inp:
        return ALPACA_SYSTEM + "\n\n" + ALPACA_TURN.format(instruction=instruction, input=inp), output
    return ALPACA_SYSTEM_NO_INPUT + "\n\n" + ALPACA_TURN_NO_INPUT.format(instruction=instruction), output


def conversation(rec: dict[str, Any], where: str, system_column: bool) -> tuple[list[dict[str, Any]], Any]:
    """The turns axolotl's chat_template strategy gives the template, and the record's tools. ``system_column``:
    some record of the dataset has a ``system`` field — axolotl reads the dataset with one schema and tokenizes
    in batches, where a record without the field has it as None and still gets a system turn (empty content)."""
    messages = rec.get("messages", rec.get("conversations"))
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError as exc:
            raise QPlanError(f"{where}: messages are text that is not JSON") from exc
    turns = []
    for m in messages_list(messages, where, keep_extra=True):
        if isinstance(m["content"], list):
            raise QPlanError(f"{where}: content given as a list of parts is not planned (give it as text)")
        turn = {k: v for k, v in m.items() if v is not None}
        turn["role"] = ROLES.get(m["role"], m["role"])
        turns.append(turn)
    if turns[0]["role"] != "system" and (system_column or "system" in rec):
        turns.insert(0, {"role": "system", "content": rec.get("system")})
    return turns, record_tools(rec, where)


def _edges(formatter: Any, texts: list[str]) -> tuple[list[int], list[int], list[int]]:
    """Per non-empty text: its token count, and whether its ids start with BOS / end with EOS. The tokenizer's
    post-processor adds the same special tokens to every text (found once, from a probe); only a text holding
    the BOS or EOS string itself can change that, and those few are tokenized in full (the rest take the
    length-only fast path)."""
    tok = formatter.tok
    eos, bos = tok.eos_token_id, tok.bos_token_id
    probe = formatter.ids(["a"], keep=True)[0]
    adds_bos, adds_eos = bool(probe) and probe[0] == bos, bool(probe) and probe[-1] == eos
    marks = [m for m in (tok.bos_token, tok.eos_token) if m]
    lengths = formatter.ids(texts, keep=False)
    starts = [int(adds_bos)] * len(texts)
    ends = [int(adds_eos)] * len(texts)
    odd = [i for i, t in enumerate(texts) if any(m in t for m in marks)]
    for i, ids in zip(odd, formatter.ids([texts[i] for i in odd], keep=True), strict=True):
        starts[i], ends[i] = int(bool(ids) and ids[0] == bos), int(bool(ids) and ids[-1] == eos)
    return list(lengths), starts, ends


def _spread(values: list[int], present: list[bool]) -> list[int]:
    """``values`` (one per present item) back in place, 0 for the absent ones."""
    it = iter(values)
    return [next(it) if p else 0 for p in present]


def columns(formatter: Any, rows: Sequence[dict[str, Any]], fmt: str, where: str) -> dict[str, list[int]]:
    """Step 1 of the module docstring: per-record token columns (``formatter``: a ``formats.Formatter``)."""
    if fmt == "axolotl:alpaca":
        prompts, responses = zip(*(alpaca_prompt(r, f"{where} row {i}") for i, r in enumerate(rows, 1)), strict=True)
        p_ids = formatter.ids(list(prompts), keep=False)
        present = [bool(r) for r in responses]  # an empty response is no tokens at all (``_tokenize``)
        n, starts, ends = _edges(formatter, [r for r in responses if r])
        return {"prompt": list(p_ids), "response": _spread(n, present), "response_eos": _spread(ends, present),
                "response_bos": _spread(starts, present)}
    if fmt == "axolotl:completion":
        texts = []
        for i, r in enumerate(rows, 1):
            v = r.get("text")
            if v is None:
                raise QPlanError(f"{where} row {i}: no 'text' field (axolotl's completion type reads it)")
            if not isinstance(v, str):
                raise QPlanError(f"{where} row {i}: field 'text' must be a string, got {type(v).__name__}")
            texts.append(v)
        present = [bool(t) for t in texts]
        n, _, ends = _edges(formatter, [t for t in texts if t])
        return {"tokens": _spread(n, present), "eos": _spread(ends, present)}
    if fmt == "axolotl:chat_template":
        tokens, untrained = [], []
        system_column = any("system" in r for r in rows)
        for i, r in enumerate(rows, 1):
            w = f"{where} row {i}"
            turns, tools = conversation(r, w, system_column)
            kw = {"tools": tools} if tools else {}
            tokens.append(formatter.chat(turns, w, keep=False, **kw))
            first = next((j for j, t in enumerate(turns) if t["role"] == "assistant"), None)
            # the tokens before the first answer: the conversation up to it, with the generation prompt
            if first is None:  # nothing to train on
                untrained.append(0)
            elif first == 0:  # an answer first: trained from its first token
                untrained.append(1)
            else:
                untrained.append(1 + formatter.chat(turns[:first], w, keep=False, add_generation_prompt=True, **kw))
        return {"tokens": tokens, "untrained": untrained}
    raise ValueError(fmt)


def samples(cols: dict[str, list[int]], fmt: str, sequence_len: int) -> tuple[list[int], list[int], list[int]]:
    """Step 2 of the module docstring: (record index of each sample, its tokens, the tokens before its first
    trainable one — ``-1``: none is trainable), before the length filter."""
    L = sequence_len
    rows: list[int] = []
    lengths: list[int] = []
    trainable: list[int] = []
    if fmt == "axolotl:alpaca":
        for i, (p, r, r_eos, r_bos) in enumerate(zip(cols["prompt"], cols["response"], cols["response_eos"],
                                                     cols["response_bos"], strict=True)):
            r_len = min(r, L)
            if r and r < L and not r_eos:
                r_len += 1  # _tokenize appends EOS to a part shorter than max_length
            if r and r_bos:
                r_len -= 1  # strip_bos_token=True for the response
            rows.append(i)
            lengths.append(min(p, L) + r_len)
            trainable.append(min(p, L) if r_len > 0 else -1)  # train_on_inputs: false masks the prompt
    elif fmt == "axolotl:completion":
        cap = COMPLETION_CAP * L
        for i, (n, ends_eos) in enumerate(zip(cols["tokens"], cols["eos"], strict=True)):
            m = min(n, cap) + (1 if n and n < cap and not ends_eos else 0)
            for start in range(0, m, L):
                rows.append(i)
                lengths.append(min(L, m - start))
                trainable.append(0)  # completion labels are the input ids
    elif fmt == "axolotl:chat_template":
        for i, (n, u) in enumerate(zip(cols["tokens"], cols["untrained"], strict=True)):
            rows.append(i)
            lengths.append(n)
            trainable.append(u - 1)  # stored + 1 (cache columns are counts >= 0)
    else:
        raise ValueError(fmt)
    return rows, lengths, trainable


def select(rows: list[int], lengths: list[int], untrained: list[int], sequence_len: int, long_samples: str,
           packing: bool, where: str) -> tuple[list[int], list[int], int, int]:
    """axolotl's filters: (kept record indices, kept lengths, truncated count, dropped count). ``untrained``: the
    tokens before each sample's first trainable one (-1: none), so a truncation that cuts every trainable token
    away leaves nothing to train on."""
    kept_rows, kept, truncated, dropped = [], [], 0, 0
    for i, n, u in zip(rows, lengths, untrained, strict=True):
        if n > sequence_len:
            if long_samples == "raise":
                raise QPlanError(f"{where} row {i + 1}: {n:,} tokens, over sequence_len {sequence_len:,} — axolotl "
                                 "stops here (excess_length_strategy: raise)")
            if long_samples == "drop":
                dropped += 1
                continue
            truncated += 1
            n = sequence_len
        if n < MIN_SAMPLE_LEN or (packing and not 0 <= u < n):
            dropped += 1
            continue
        kept_rows.append(i)
        kept.append(n)
    return kept_rows, kept, truncated, dropped
