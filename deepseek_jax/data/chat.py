"""Conversations to token ids and an assistant-token mask, through a chat template.

Sources (`load_conversations`):

  JSONL, one conversation a line, either
      {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  or  {"prompt": "...", "completion": "..."}      (read as one user turn and one assistant turn)
  Other fields are ignored. A line that is not JSON, has neither form, or has no assistant
  turn is an error naming the file and the line.
  `load_hf_dataset(name, split)` reads the same two forms from an HF `datasets` dataset when
  that package is installed (it is not a dependency; without it the error says so).

Templates (`ChatTemplate`):

  from_tokenizer_config(path)  the Jinja `chat_template` of an HF `tokenizer_config.json`
                               (a string, or a list of {"name", "template"}: "default" is used),
                               rendered with jinja2's sandbox, `bos_token`/`eos_token` and
                               `add_generation_prompt` as transformers passes them;
  BYTE_TEMPLATE                the byte tokenizer's built-in template: bos, then each message's
                               content as it is (a system message followed by a newline), each
                               assistant message followed by eos, nothing for the generation
                               prompt. The text carries its own format, as R1-Zero's prompts do
                               ("… User: {q}. Assistant:" or the demo's "{q} <think>"), so a
                               prompt/completion pair renders to exactly bos + prompt +
                               completion + eos: what GRPO samples and `rl.evaluate` prompts.

Finding the assistant spans (`tokenize_conversation`). For each assistant turn i the template
renders messages[:i] with the generation prompt (P_i) and messages[:i+1] without (Q_i); Q_i must
start with P_i, and the turn's text is Q_i[len(P_i):] — whatever the template writes for that
turn after its generation prompt, closing tokens such as eos included, which the model must
learn to emit. When the whole conversation's render starts with every Q_i (the template never
rewrites an earlier turn), the conversation is one sample whose spans are those pieces. A
template that rewrites history (DeepSeek-R1's drops the reasoning of earlier assistant turns)
fails that check; each assistant turn then becomes its own sample, Q_i with only turn i's span
trained, which is the text the model sees when it writes that turn at inference. No markers are
inserted into the template and no message content is searched for, so repeated or empty
contents cannot confuse the spans.

The rendered text is tokenized whole (so BPE merges match inference), with character offsets;
a token is trained iff its first character lies in a span. A token that straddles a span's start
therefore counts when the span opens it, and one that straddles the end counts too.

Left out: tool calls and multimodal content (the templates may render them; the loaders only
read role/content strings), and truncation — the packer (`data/sft.py`) handles length.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Iterable

import numpy as np

from deepseek_jax.data import jsonl
from deepseek_jax.data import tokenizer as byte_tokenizer
from deepseek_jax.data.encoding import Encoder

ROLES = ("system", "user", "assistant")

# The byte tokenizer's special ids, spelled as DeepSeek's tokenizer spells them.
BYTE_BOS, BYTE_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
BYTE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}")


class ChatError(ValueError):
    """A conversation or template that cannot become a training sample (names file and line)."""


# --- sources ---------------------------------------------------------------------------------

def to_messages(record: Any, where: str) -> list[dict[str, str]]:
    """A record's messages ({"messages": [...]} or {"prompt", "completion"}), checked."""
    if not isinstance(record, dict):
        raise ChatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ChatError(f"{where}: 'messages' must be a non-empty list of "
                            "{'role', 'content'} objects")
        for j, m in enumerate(messages):
            if (not isinstance(m, dict) or m.get("role") not in ROLES
                    or not isinstance(m.get("content"), str)):
                raise ChatError(f"{where}: message {j} needs a 'role' in {list(ROLES)} and a "
                                f"string 'content', got {m!r}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "prompt" in record and "completion" in record:
        if not all(isinstance(record[k], str) for k in ("prompt", "completion")):
            raise ChatError(f"{where}: 'prompt' and 'completion' must be strings")
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    else:
        raise ChatError(f"{where}: needs a 'messages' list or 'prompt' and 'completion' fields "
                        f"(found {sorted(record)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError(f"{where}: the conversation has no assistant turn, so nothing to "
                        "train on; add one or drop the line")
    return messages


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, str]]
    where: str                       # "FILE:LINE" (or "DATASET[split][i]"), for errors


def load_conversations(path: str) -> list[Conversation]:
    """Every conversation of a JSONL file (blank lines skipped), checked line by line."""
    out = [Conversation(to_messages(record, where), where)
           for where, _, record in jsonl.records(path, ChatError)]
    if not out:
        raise ChatError(f"{path}: no conversations")
    return out


def load_hf_dataset(name: str, split: str = "train") -> list[Conversation]:
    """The conversations of an HF `datasets` dataset (hub name or local folder), same forms."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"data.hf_dataset={name!r} needs the `datasets` package (pip install "
                          "datasets), or export the data to JSONL and set data.path") from None
    rows = datasets.load_dataset(name, split=split)
    return [Conversation(to_messages(dict(r), f"{name}[{split}][{i}]"), f"{name}[{split}][{i}]")
            for i, r in enumerate(rows)]


# --- templates -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    source: str                     # the template text
    bos_token: str
    eos_token: str
    origin: str = "built-in byte template"      # for errors: where the template came from

    @classmethod
    def from_tokenizer_config(cls, path: str) -> "ChatTemplate":
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ChatError(f"cannot read {path} as a tokenizer_config.json: {e}") from None
        template = config.get("chat_template")
        if isinstance(template, list):        # named templates: the default one
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if not isinstance(template, str) or not template:
            raise ChatError(f"{path} has no chat_template string; pass a tokenizer_config.json "
                            "that has one")
        return cls(template, _token(config, "bos_token"), _token(config, "eos_token"),
                   origin=path)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool,
               where: str = "") -> str:
        try:
            return _compile(self.source).render(
                messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2's TemplateError and whatever the template raises
            raise ChatError(f"{where}: the chat template of {self.origin} failed to render "
                            f"this conversation: {type(e).__name__}: {e}") from None


BYTE_CHAT_TEMPLATE = ChatTemplate(BYTE_TEMPLATE, BYTE_BOS, BYTE_EOS)


def _token(config: dict, key: str) -> str:
    """A special token's text: a plain string, or an AddedToken object's "content"."""
    value = config.get(key)
    return value.get("content", "") if isinstance(value, dict) else value or ""


def _raise(message):
    raise ValueError(message)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """The sandboxed jinja2 template (cached): trim_blocks/lstrip_blocks as transformers does,
    `raise_exception` for templates that reject a conversation."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def default_template(tokenizer_path: str, chat_template: str = "") -> ChatTemplate:
    """`chat_template` (a tokenizer_config.json path) if given, else the tokenizer_config.json
    beside `tokenizer_path`, else the byte template when there is no tokenizer."""
    if chat_template:
        return ChatTemplate.from_tokenizer_config(chat_template)
    if not tokenizer_path:
        return BYTE_CHAT_TEMPLATE
    beside = os.path.join(os.path.dirname(tokenizer_path), "tokenizer_config.json")
    if not os.path.exists(beside):
        raise ChatError(f"no tokenizer_config.json beside {tokenizer_path}: set "
                        "data.chat_template to the model's tokenizer_config.json")
    return ChatTemplate.from_tokenizer_config(beside)


# --- spans and tokens ------------------------------------------------------------------------

def assistant_spans(messages: list[dict[str, str]], template: ChatTemplate,
                    where: str = "") -> list[tuple[str, list[tuple[int, int]]]]:
    """[(text, [(start, end) character spans trained])], one entry for a template that keeps
    history, one per assistant turn for one that rewrites it (module docstring)."""
    turns = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = template.render(messages[:i], True, where)
        whole = template.render(messages[: i + 1], False, where)
        if not whole.startswith(prefix):
            raise ChatError(f"{where}: the chat template of {template.origin} renders assistant "
                            f"turn {i} so that the text before it differs from its generation "
                            "prompt; assistant tokens cannot be located")
        turns.append((whole, (len(prefix), len(whole))))
    full = template.render(messages, False, where)
    if all(full.startswith(text) for text, _ in turns):
        return [(full, [span for _, span in turns])]
    return [(text, [span]) for text, span in turns]


def encode_with_offsets(text: str, encoder: Encoder) -> tuple[np.ndarray, np.ndarray]:
    """(ids [L] int32, character offsets [L, 2]) of `text`, special tokens spelled in the text
    becoming their ids: the HF tokenizer's own (added tokens), or bos/eos for the byte one."""
    if encoder.path is not None:
        enc = _hf_tokenizer(encoder.path).encode(text, add_special_tokens=False)
        return np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int64).reshape(-1, 2)
    ids, offsets, k = [], [], 0
    specials = {BYTE_BOS: byte_tokenizer.BOS, BYTE_EOS: byte_tokenizer.EOS}
    while k < len(text):
        special = next((s for s in specials if text.startswith(s, k)), None)
        if special:
            ids.append(specials[special])
            offsets.append((k, k + len(special)))
            k += len(special)
            continue
        for b in byte_tokenizer.encode(text[k]):          # one id per UTF-8 byte
            ids.append(b)
            offsets.append((k, k + 1))
        k += 1
    return np.asarray(ids, np.int32), np.asarray(offsets, np.int64).reshape(-1, 2)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(path: str):
    import tokenizers
    return tokenizers.Tokenizer.from_file(path)


@dataclasses.dataclass(frozen=True)
class Sample:
    tokens: np.ndarray          # [L] int32
    mask: np.ndarray            # [L] float32: 1 on the assistant tokens trained
    where: str


def tokenize_conversation(conversation: Conversation, template: ChatTemplate,
                          encoder: Encoder) -> list[Sample]:
    """The conversation's training samples (one, or one per assistant turn)."""
    return [_masked(text, spans, encoder, conversation.where)
            for text, spans in assistant_spans(conversation.messages, template,
                                               conversation.where)]


def last_turn_sample(messages: list[dict[str, str]], template: ChatTemplate, encoder: Encoder,
                     where: str) -> Sample:
    """The conversation as one sample whose mask covers its last message only (an assistant
    turn): a response to everything before it, as preference pairs score it."""
    if messages[-1]["role"] != "assistant":
        raise ChatError(f"{where}: the response must end with an assistant message")
    text, spans = assistant_spans(messages, template, where)[-1]
    return _masked(text, spans[-1:], encoder, where)


def _masked(text: str, spans: list[tuple[int, int]], encoder: Encoder, where: str) -> Sample:
    """`text` tokenized, the tokens whose first character lies in a span masked in."""
    ids, offsets = encode_with_offsets(text, encoder)
    starts = offsets[:, 0]
    mask = np.zeros(len(ids), np.float32)
    for start, end in spans:
        mask[(starts >= start) & (starts < end)] = 1.0
    if not mask.any():
        raise ChatError(f"{where}: the assistant turns are empty after tokenization; nothing "
                        "to train on")
    return Sample(ids, mask, where)


def tokenize_all(conversations: Iterable[Conversation], template: ChatTemplate,
                 encoder: Encoder) -> list[Sample]:
    return [s for c in conversations for s in tokenize_conversation(c, template, encoder)]
