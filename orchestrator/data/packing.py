"""Pack tokenized documents into fixed-length blocks for causal language modelling."""

from collections.abc import Sequence

import torch

from orchestrator.data.tokenizer import TextTokenizer


def pack_texts(texts: Sequence[str], block_size: int, tokenizer: TextTokenizer) -> torch.Tensor:
    """Concatenate `texts` (each followed by eos) and cut them into rows of block_size + 1 tokens.

    The extra token lets one row give both the inputs and the next-token labels (see
    `split_inputs_and_labels`). Tokens past the last whole row are dropped.
    Returns a LongTensor [n_blocks, block_size + 1].
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    stream: list[int] = []
    for ids in tokenizer.encode_batch(texts):
        stream.extend(ids)
        stream.append(tokenizer.eos_id)
    width = block_size + 1
    n_blocks = len(stream) // width
    if n_blocks == 0:
        raise ValueError(
            f"{len(texts)} texts give {len(stream)} tokens, fewer than one block of "
            f"block_size + 1 = {width}; generate more examples or lower block_size"
        )
    return torch.tensor(stream[: n_blocks * width], dtype=torch.long).view(n_blocks, width)


def split_inputs_and_labels(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (inputs, labels), each [n, block_size]: labels[:, t] is the token after inputs[:, t].

    The labels are already shifted: do not also pass them to a model that shifts labels itself
    (Hugging Face causal LMs do).
    """
    return blocks[:, :-1], blocks[:, 1:]
