"""Byte-level tokenizer: every UTF-8 byte is a token, so it needs no vocabulary file or download."""
from collections.abc import Iterable


class ByteTokenizer:
    """Ids 0..255 are raw bytes; three special tokens follow them.

    A byte vocabulary keeps the default job offline and makes any text encodable; the synthetic
    corpus is ASCII, so one character is one token there.
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of `text` as token ids (no special tokens added)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of `ids`, skipping special tokens; broken UTF-8 decodes to U+FFFD."""
        ids = [int(token) for token in ids]  # accepts tensors and numpy arrays as well as lists
        out_of_range = [token for token in ids if not 0 <= token < self.vocab_size]
        if out_of_range:
            raise ValueError(
                f"token ids {out_of_range[:5]} are outside the byte vocabulary [0, {self.vocab_size})"
            )
        return bytes(token for token in ids if token < 256).decode("utf-8", errors="replace")
