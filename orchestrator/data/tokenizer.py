"""Tokenizers behind one small interface (``encode_batch``, ``eos_id``, ``vocab_size``, ``identity``).

The byte-level tokenizer needs no vocabulary file or download, so the default job runs offline; a model's
own tokenizer (``transformers.AutoTokenizer``) is used when the job names one or trains a pretrained model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from orchestrator.spec import DataSpec, ModelSpec

BYTE_TOKENIZER = "byte"


class TextTokenizer(Protocol):
    """What packing and the token cache need from a tokenizer."""

    eos_id: int
    vocab_size: int
    identity: str  # names the exact vocabulary, so the token cache never mixes two tokenizers' ids

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are raw bytes; three special tokens follow them.

    A byte vocabulary keeps the default job offline and makes any text encodable; the synthetic
    corpus is ASCII, so one character is one token there.
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259
    identity = BYTE_TOKENIZER

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of `text` as token ids (no special tokens added)."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of `ids`, skipping special tokens; broken UTF-8 decodes to U+FFFD."""
        ids = [int(token) for token in ids]  # accepts tensors and numpy arrays as well as lists
        out_of_range = [token for token in ids if not 0 <= token < self.vocab_size]
        if out_of_range:
            raise ValueError(f"token ids {out_of_range[:5]} are outside the byte vocabulary [0, {self.vocab_size})")
        return bytes(token for token in ids if token < 256).decode("utf-8", errors="replace")


class PretrainedTokenizer:
    """A ``transformers`` tokenizer (local path or hub name) behind the TextTokenizer interface.

    Documents are separated by the tokenizer's end-of-text token, as in the model's pre-training; no other
    special tokens are added, since packing cuts the stream into blocks regardless of document starts.
    """

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        self.name = name
        self._tokenizer = AutoTokenizer.from_pretrained(name)
        eos_id = self._tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError(
                f"tokenizer {name!r} has no end-of-text token, which xcm puts between documents; "
                "choose a tokenizer with an eos token (or data.tokenizer: byte)"
            )
        self.eos_id = int(eos_id)
        self.vocab_size = len(self._tokenizer)  # counts added tokens too, unlike tokenizer.vocab_size
        vocabulary = json.dumps(sorted(self._tokenizer.get_vocab().items()))
        self.identity = f"{name}@{hashlib.sha256(vocabulary.encode()).hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(token) for token in ids], skip_special_tokens=True)


def tokenizer_name(data: DataSpec, model: ModelSpec) -> str:
    """The job's tokenizer: the one the data section names, else a pretrained model's own, else bytes."""
    if data.tokenizer:
        return data.tokenizer
    if model.init == "pretrained" and model.pretrained:
        return model.pretrained
    return BYTE_TOKENIZER


def load_tokenizer(data: DataSpec, model: ModelSpec) -> TextTokenizer:
    """Build the job's tokenizer (see ``tokenizer_name``)."""
    name = tokenizer_name(data, model)
    return ByteTokenizer() if name == BYTE_TOKENIZER else PretrainedTokenizer(name)
