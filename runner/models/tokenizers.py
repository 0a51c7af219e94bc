"""A byte-level tokenizer for tiny random test models.

`ByteTokenizer` maps text to its UTF-8 bytes (ids 0-255) plus a few special tokens. It
implements the small part of the Hugging Face tokenizer interface that `runner.data` and the
training loop use, so a tiny model (vocab_size >= `ByteTokenizer.vocab_size`) can be trained
and evaluated without downloading anything:

    encode(text, add_special_tokens=...)  -> list[int]
    decode(ids, skip_special_tokens=...)  -> str
    apply_chat_template(messages, tokenize=False, add_generation_prompt=...)
    bos_token_id, eos_token_id, pad_token_id, vocab_size, chat_template, len()

Special tokens written literally in the text (e.g. "</s>") are encoded as the special token,
as Hugging Face tokenizers do. The chat template renders each message as
``<|role|>content</s>``; the generation prompt is ``<|assistant|>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS) + tuple(f"<|{r}|>" for r in ROLES)


class ByteTokenizer:
    """UTF-8 bytes (ids 0-255) followed by special tokens: pad, bos, eos, role markers."""

    name_or_path = "bytes"
    padding_side = "right"
    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}" \
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}"

    def __init__(self) -> None:
        self._special_to_id = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._id_to_special = {i: tok for tok, i in self._special_to_id.items()}
        self._special_re = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

    # -- special tokens ------------------------------------------------------------------------
    pad_token, bos_token, eos_token = PAD, BOS, EOS

    @property
    def pad_token_id(self) -> int:
        return self._special_to_id[PAD]

    @property
    def bos_token_id(self) -> int:
        return self._special_to_id[BOS]

    @property
    def eos_token_id(self) -> int:
        return self._special_to_id[EOS]

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._id_to_special)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def role_token_id(self, role: str) -> int:
        return self._special_to_id[f"<|{role}|>"]

    def convert_tokens_to_ids(self, token: str) -> int:
        if token in self._special_to_id:
            return self._special_to_id[token]
        raw = token.encode("utf-8")
        if len(raw) != 1:
            raise KeyError(f"not a single-byte token: {token!r}")
        return raw[0]

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        """UTF-8 bytes of `text`; special-token strings become their ids; BOS first if asked."""
        ids: list[int] = [self.bos_token_id] if add_special_tokens else []
        pos = 0
        for m in self._special_re.finditer(text):
            ids.extend(text[pos : m.start()].encode("utf-8"))
            ids.append(self._special_to_id[m.group(0)])
            pos = m.end()
        ids.extend(text[pos:].encode("utf-8"))
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, **_: Any) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i not in self._id_to_special:
                raise ValueError(f"token id {i} is outside the byte vocabulary (0..{self.vocab_size - 1})")
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if not skip_special_tokens:
                out.append(self._id_to_special[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    # -- chat ----------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, str]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        **_: Any,
    ) -> str | list[int]:
        """Render ``<|role|>content</s>`` per message, plus ``<|assistant|>`` if asked."""
        parts = []
        for m in messages:
            role = m["role"]
            if role not in ROLES:
                raise ValueError(f"unknown chat role {role!r} (expected one of {', '.join(ROLES)})")
            parts.append(f"<|{role}|>{m['content']}{EOS}")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        text = "".join(parts)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"
