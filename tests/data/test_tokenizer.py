import torch

from orchestrator.data import ByteTokenizer


def test_round_trips_ascii_and_unicode():
    """encode then decode returns the original text, including multi-byte characters."""
    tokenizer = ByteTokenizer()
    for text in ["add: 23+58=81", "brackets: (()())=yes", "naïve — ünïcode ✓", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_ids_are_bytes_and_specials_follow():
    """Byte ids fill 0..255 and the three special tokens make a vocabulary of 259."""
    tokenizer = ByteTokenizer()
    assert tokenizer.encode("A") == [65]
    assert {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id} == {256, 257, 258}
    assert tokenizer.vocab_size == 259


def test_decode_skips_special_tokens_and_accepts_tensors():
    """Special tokens vanish from decoded text, and a tensor of ids decodes like a list."""
    tokenizer = ByteTokenizer()
    ids = [tokenizer.bos_id, *tokenizer.encode("ab"), tokenizer.eos_id, tokenizer.pad_id]
    assert tokenizer.decode(torch.tensor(ids)) == "ab"
