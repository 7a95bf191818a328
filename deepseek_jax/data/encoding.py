"""Documents to token ids for the pipeline: the byte tokenizer, or an HF `tokenizer.json`.

`Encoder(path=None)` uses `deepseek_jax.data.tokenizer` (no files needed, 259 ids). With `path` set
to a Hugging Face `tokenizer.json` (DeepSeek-V3's, or any other) it uses the `tokenizers` package,
imported only then. Either way `encoder(text)` returns int32 ids with `eos_id` appended, and
optionally `bos_id` prepended: the pipeline packs those documents as they are.

The HF file is read lazily in each process that encodes, so an `Encoder` pickles as its settings
alone and works inside Grain worker processes. Encoding never adds the tokenizer's own template
tokens (`add_special_tokens=False`); bos/eos come only from the flags here, so that a document looks
the same whatever post-processor the tokenizer file declares.

Chat templates (SFT) are `data/chat.py`'s; GRPO formats its prompts itself (`data/r1.py`).

Left out: training a tokenizer.
"""

from __future__ import annotations

import numpy as np

from deepseek_jax.data import tokenizer as byte_tokenizer

# Special-token spellings tried, in order, when eos_token/bos_token/pad_token are not given.
EOS_NAMES = ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<s>", "<bos>", "<|begin_of_text|>")
PAD_NAMES = ("<｜▁pad▁｜>", "<pad>", "<|pad|>", "[PAD]")


class Encoder:
    """Callable text -> int32 ids [L] with eos (and optionally bos) added.

    Args:
        path: an HF `tokenizer.json`; None for the byte tokenizer.
        add_bos: prepend `bos_id` to every document.
        eos_token, bos_token, pad_token: the special tokens' spellings in the HF vocabulary; when
            None, the usual spellings (DeepSeek's first) are tried. Ignored without `path`.
    """

    def __init__(self, path: str | None = None, *, add_bos: bool = False,
                 eos_token: str | None = None, bos_token: str | None = None,
                 pad_token: str | None = None):
        self.path = None if path is None else str(path)
        self.add_bos = add_bos
        self._names = (eos_token, bos_token, pad_token)
        self._hf = None
        if self.path is None:
            self.eos_id, self.bos_id, self.pad_id = (byte_tokenizer.EOS, byte_tokenizer.BOS,
                                                     byte_tokenizer.PAD)
            self.vocab_size = byte_tokenizer.VOCAB_SIZE
        else:
            hf = self._load()
            self.eos_id = self._lookup(hf, eos_token, EOS_NAMES, "eos_token", required=True)
            self.bos_id = self._lookup(hf, bos_token, BOS_NAMES, "bos_token", required=add_bos)
            pad = self._lookup(hf, pad_token, PAD_NAMES, "pad_token", required=False)
            self.pad_id = self.eos_id if pad is None else pad   # padding is masked out anyway
            self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

    def _load(self):
        if self._hf is None:
            try:
                import tokenizers
            except ImportError:
                raise ImportError("tokenizer_path needs the `tokenizers` package: "
                                  "pip install tokenizers") from None
            try:
                self._hf = tokenizers.Tokenizer.from_file(self.path)
            except Exception as e:  # the Rust error names the problem but not the file
                raise ValueError(f"cannot read {self.path!r} as an HF tokenizer.json: {e}") from e
        return self._hf

    def _lookup(self, hf, name, candidates, arg, required):
        names = (name,) if name is not None else candidates
        for n in names:
            token_id = hf.token_to_id(n)
            if token_id is not None:
                return int(token_id)
        if required:
            raise ValueError(f"{self.path} has none of the tokens {list(names)}; pass {arg}= with "
                             "the spelling its vocabulary uses")
        return None

    def __call__(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if self.path is None:
            ids = byte_tokenizer.encode(text)
        else:
            ids = self._load().encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if self.add_bos else []
        return np.asarray(head + list(ids) + [self.eos_id], np.int32)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt to continue: bos (when `add_bos`) + ids, no eos."""
        if self.path is None:
            ids = byte_tokenizer.encode(text)
        else:
            ids = self._load().encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.add_bos else []) + [int(i) for i in ids]

    def decode(self, ids) -> str:
        """Generated ids to text, cut at the first eos (special tokens dropped)."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        if self.path is None:
            return byte_tokenizer.decode(ids)
        return self._load().decode(ids, skip_special_tokens=True)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_hf"] = None                      # reloaded from `path` where it is used
        return state

    def __repr__(self):
        return f"Encoder(path={self.path!r}, add_bos={self.add_bos}, eos_id={self.eos_id})"
