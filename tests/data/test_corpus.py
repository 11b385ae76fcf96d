from orchestrator.data import TASKS, build_synthetic_blocks, build_validation_blocks, task_blocks, task_of


def test_training_blocks_are_packed_byte_tokens():
    """build_synthetic_blocks returns [n, block_size + 1] ids inside the tokenizer's vocabulary."""
    blocks, tokenizer = build_synthetic_blocks(num_examples=300, block_size=32, seed=0)
    assert blocks.shape[1] == 33 and len(blocks) > 100
    assert int(blocks.min()) >= 0 and int(blocks.max()) < tokenizer.vocab_size


def test_validation_blocks_differ_from_training_blocks():
    """The validation helper gives different blocks from training for the same seed."""
    train, _ = build_synthetic_blocks(num_examples=200, block_size=32, seed=0)
    validation, _ = build_validation_blocks(num_examples=200, block_size=32, seed=0)
    assert train.shape[1] == validation.shape[1]
    assert not train[: len(validation)].equal(validation[: len(train)])


def test_task_blocks_hold_only_their_own_task():
    """Each task's eval blocks decode to texts tagged with that task alone."""
    blocks_by_task = task_blocks(num_examples_per_task=40, block_size=32, seed=0)
    assert set(blocks_by_task) == set(TASKS)
    for task, blocks in blocks_by_task.items():
        flat = blocks.flatten().tolist()
        texts = bytes(token if token < 256 else ord("\n") for token in flat).decode().split("\n")
        whole_texts = texts[1:-1]  # the first and last may be cut by block edges
        assert whole_texts and {task_of(text) for text in whole_texts} == {task}
