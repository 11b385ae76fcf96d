import pytest
import torch

from orchestrator.data import ByteTokenizer, pack_texts, split_inputs_and_labels


def test_blocks_have_block_size_plus_one_columns_and_drop_the_remainder():
    """Packing yields floor(tokens / (block_size + 1)) rows of block_size + 1 tokens."""
    texts = ["abcd", "efg", "hi"]  # 4+1 + 3+1 + 2+1 = 12 tokens with eos
    blocks = pack_texts(texts, block_size=4, tokenizer=ByteTokenizer())
    assert blocks.shape == (2, 5)
    assert blocks.dtype == torch.long


def test_documents_are_separated_by_eos_in_order():
    """The packed stream is each document's bytes followed by eos, in the given order."""
    tokenizer = ByteTokenizer()
    blocks = pack_texts(["ab", "c"], block_size=4, tokenizer=tokenizer)
    assert blocks.tolist() == [[97, 98, tokenizer.eos_id, 99, tokenizer.eos_id]]


def test_labels_are_inputs_shifted_by_one():
    """Within a block, labels[t] is inputs[t + 1]: the next-token target."""
    blocks = pack_texts(["hello world"] * 10, block_size=8, tokenizer=ByteTokenizer())
    inputs, labels = split_inputs_and_labels(blocks)
    assert inputs.shape == labels.shape == (len(blocks), 8)
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert torch.equal(labels[:, -1], blocks[:, -1])


def test_too_few_tokens_for_one_block_is_an_error():
    """Texts shorter than one block raise, naming the token count and what to change."""
    with pytest.raises(ValueError, match=r"3 tokens.*block_size"):
        pack_texts(["ab"], block_size=8, tokenizer=ByteTokenizer())
