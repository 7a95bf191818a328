"""Preference pairs (a prompt, a chosen and a rejected response) to the rows DPO trains on.

Sources (`load_pairs`, `load_hf_pairs`), one pair a JSONL line or dataset row, in the forms
preference datasets use:

  {"prompt": "...", "chosen": "...", "rejected": "..."}           one user turn, two answers
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
      the responses are the messages that follow the prompt; each must end with an assistant
      message
  {"chosen": [messages], "rejected": [messages]}                   the prompt left implicit:
      two whole conversations that agree on every message but the last (an assistant turn);
      lists that start with a system or user message are read this way even beside a "prompt"
      field, which is then ignored (HuggingFaceH4/ultrafeedback_binarized has both)

Other fields are ignored; a line in no form is an error naming the file and the line.

Each side is rendered with the chat template as prompt + response (`chat.last_turn_sample`),
so the trained mask covers the last assistant turn only, closing tokens such as eos included;
earlier assistant turns are context. The rendered text is tokenized whole, as for SFT.

Rows (`PairRows`): one pair a row, the chosen side at index 0 and the rejected at 1, each side
[T] right-padded, not packed:

  tokens      [R, 2, T]  int32
  mask        [R, 2, T]  1 where tokens[i+1] is a response token: position i scores the
                         next token, as in GRPO's rows (`rl/step.py`)
  token_mask  [R, 2, T]  1 on real tokens (keeps padding out of the expert loads)

A side longer than T is cut to its first T tokens (counted in `truncated`); a pair one of whose
responses has no token left is dropped (counted in `dropped`), since its log-ratio would score
the prompt alone. Batches (`pair_batches`, `eval_batches`) read the rows as SFT's do
(`data/sft.py`): a seeded permutation each epoch, the batch of step s a pure function of (seed,
s); held-out batches padded with empty pairs (all masks 0), which count for nothing.

Left out: packing several pairs into a row (each side needs its own sum over positions; a
padding-free layout would save the pad tokens of short pairs), and separate prompt and response
length limits (TRL's max_prompt_length; here one cut keeps the start of the prompt).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from deepseek_jax.data import chat, jsonl
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.data.packing import check_seq_len
from deepseek_jax.data.sft import SFTBatches, eval_batches, split_held_out

__all__ = ["PAIR_FEATURES", "Pair", "PairRows", "eval_batches", "load_hf_pairs", "load_pairs",
           "pair_batches", "pair_rows", "rows_from_config", "to_pair"]

PAIR_FEATURES = ("tokens", "mask", "token_mask")


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: list[dict[str, str]]       # the messages before the responses
    chosen: list[dict[str, str]]       # the preferred response's messages (last: assistant)
    rejected: list[dict[str, str]]
    where: str                         # "FILE:LINE", for errors


def _messages(value: Any, role: str, where: str, field: str) -> list[dict[str, str]]:
    """A field as messages: a string is one message of `role`; a list is checked by chat's
    rules (each a {"role", "content"} with a known role and string content)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise chat.ChatError(f"{where}: '{field}' must be a string or a non-empty list of "
                             "{'role', 'content'} messages")
    for j, m in enumerate(value):
        if (not isinstance(m, dict) or m.get("role") not in chat.ROLES
                or not isinstance(m.get("content"), str)):
            raise chat.ChatError(f"{where}: '{field}' message {j} needs a 'role' in "
                                 f"{list(chat.ROLES)} and a string 'content', got {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_pair(record: Any, where: str) -> Pair:
    """A record in one of the module docstring's forms, checked."""
    if not isinstance(record, dict) or not {"chosen", "rejected"} <= set(record):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise chat.ChatError(f"{where}: a preference pair needs 'chosen' and 'rejected' fields "
                             f"(and a 'prompt', or whole conversations in both); found {found}")
    chosen = _messages(record["chosen"], "assistant", where, "chosen")
    rejected = _messages(record["rejected"], "assistant", where, "rejected")
    whole = chosen[0]["role"] != "assistant"          # conversations, not responses
    if whole or "prompt" not in record:
        if chosen[:-1] != rejected[:-1]:
            raise chat.ChatError(f"{where}: 'chosen' and 'rejected' as whole conversations must "
                                 "differ only in their last message; or give the responses "
                                 "alone, with the shared prompt as 'prompt'")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    else:
        prompt = _messages(record["prompt"], "user", where, "prompt")
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise chat.ChatError(f"{where}: the '{side}' response must end with an assistant "
                                 "message")
    if not prompt:
        raise chat.ChatError(f"{where}: the prompt is empty; a response needs something to "
                             "answer")
    return Pair(prompt, chosen, rejected, where)


def load_pairs(path: str) -> list[Pair]:
    """Every pair of a JSONL file (blank lines skipped), checked line by line."""
    out = [to_pair(record, where) for where, _, record in jsonl.records(path, chat.ChatError)]
    if not out:
        raise chat.ChatError(f"{path}: no preference pairs")
    return out


def load_hf_pairs(name: str, split: str = "train") -> list[Pair]:
    """The pairs of an HF `datasets` dataset (hub name or local folder), same forms."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"data.hf_dataset={name!r} needs the `datasets` package (pip install "
                          "datasets), or export the pairs to JSONL and set data.path") from None
    rows = datasets.load_dataset(name, split=split)
    return [to_pair(dict(r), f"{name}[{split}][{i}]") for i, r in enumerate(rows)]


@dataclasses.dataclass(frozen=True)
class PairRows:
    arrays: dict[str, np.ndarray]    # PAIR_FEATURES, each [R, 2, T]
    truncated: int                   # sides cut to T tokens
    dropped: int                     # pairs with a response cut away entirely
    pad_id: int

    def __len__(self) -> int:
        return len(self.arrays["tokens"])


def _side(sample: chat.Sample, seq_len: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """(tokens, mask, token_mask), each [T], of one rendered side (module docstring)."""
    n = min(len(sample.tokens), seq_len)
    tokens = np.full(seq_len, pad_id, np.int32)
    tokens[:n] = sample.tokens[:n]
    mask = np.zeros(seq_len, np.float32)
    mask[: n - 1] = sample.mask[1:n]                 # position i scores token i + 1
    token_mask = (np.arange(seq_len) < n).astype(np.float32)
    return tokens, mask, token_mask


def pair_rows(pairs: Sequence[Pair], template: chat.ChatTemplate, encoder: Encoder,
              seq_len: int) -> PairRows:
    """Every pair rendered, tokenized and laid out as rows (module docstring)."""
    check_seq_len(seq_len)
    rows, truncated, dropped = [], 0, 0
    for pair in pairs:
        sides = [chat.last_turn_sample(pair.prompt + response, template, encoder, pair.where)
                 for response in (pair.chosen, pair.rejected)]
        truncated += sum(len(s.tokens) > seq_len for s in sides)
        laid = [_side(s, seq_len, encoder.pad_id) for s in sides]
        if any(not m.any() for _, m, _ in laid):
            dropped += 1
            continue
        rows.append([np.stack(x) for x in zip(*laid)])         # 3 × [2, T]
    arrays = {k: (np.stack([r[j] for r in rows]) if rows else
                  np.zeros((0, 2, seq_len), np.int32 if k == "tokens" else np.float32))
              for j, k in enumerate(PAIR_FEATURES)}
    return PairRows(arrays, truncated, dropped, encoder.pad_id)


def pair_batches(rows: PairRows, global_batch: int, seed: int) -> SFTBatches:
    """Training batches over `rows` (every process reads the whole global batch): an epoch's
    seeded permutation as SFT reads its rows; `.batch(step)` → arrays [global_batch, ...]."""
    return SFTBatches(rows, global_batch, seed)


def rows_from_config(data, encoder: Encoder) -> tuple[PairRows, PairRows]:
    """(training rows, held-out rows) of a DPO run config's `data` section: pairs from `path`
    (JSONL) or `hf_dataset`, held out from `eval_path` / `hf_eval_split` or a seeded
    `validation_fraction`, rendered with `chat_template` (or the tokenizer's own, or the byte
    template) at `seq_len`."""
    template = chat.default_template(data.tokenizer, data.chat_template)
    if bool(data.path) == bool(data.hf_dataset):
        raise ValueError("set exactly one of data.path (a JSONL file of preference pairs) and "
                         "data.hf_dataset")
    if data.path:
        train = load_pairs(data.path)
        held = load_pairs(data.eval_path) if data.eval_path else None
    else:
        train = load_hf_pairs(data.hf_dataset, data.hf_split)
        held = load_hf_pairs(data.hf_dataset, data.hf_eval_split) if data.hf_eval_split else None
    if held is None:
        train, held = split_held_out(train, data.validation_fraction, data.shuffle_seed)
    train_rows = pair_rows(train, template, encoder, data.seq_len)
    if not len(train_rows):
        raise ValueError(f"every training pair lost a response to data.seq_len={data.seq_len} "
                         "tokens; raise data.seq_len")
    return train_rows, pair_rows(held, template, encoder, data.seq_len)
