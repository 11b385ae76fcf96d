"""Job files as hostile input: every bound and malformation fails fast with one clear line naming the fix."""

import itertools
import time
import tracemalloc

import pytest

from orchestrator.spec import MAX_JOB_BYTES, SpecError
from orchestrator.train.job_checks import load_spec

TINY = "jobs/tiny.yaml"


def write(tmp_path, content: str | bytes):
    path = tmp_path / "job.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def single_problem(path, overrides=()) -> str:
    """The one error line that loading ``path`` gives."""
    with pytest.raises(SpecError) as caught:
        load_spec(path, list(overrides))
    lines = str(caught.value).splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def alias_bomb(levels: int = 9) -> str:
    """A billion laughs under data.files: 9 levels of 9 aliases, 9^9 (~3.9e8) strings once expanded, < 1 KB."""
    lines = ['  a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    names = "abcdefghij"
    for previous, name in itertools.pairwise(names[:levels]):
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "anchors:\n" + "\n".join(lines) + f"\ndata:\n  source: files\n  files: *{names[levels - 1]}\n"


def test_alias_bomb_fails_within_a_second_and_a_few_megabytes(tmp_path):
    """A YAML alias bomb of under 1 KB is refused while composing: fast, in bounded memory, one line."""
    text = alias_bomb()
    assert len(text) < 1024
    path = write(tmp_path, text)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        line = single_problem(path)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "aliases expand to more than" in line and "Fix:" in line
    assert elapsed < 2.0 and peak < 20 * 2**20, (elapsed, peak)


def test_recursive_alias_is_refused(tmp_path):
    """An alias inside its own anchor (an infinitely deep value) is an error, not a RecursionError."""
    line = single_problem(write(tmp_path, "model:\n  config: &loop {x: *loop}\n"))
    assert "refers to a node that contains it" in line and ":2:" in line


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path):
    """20,000 nested brackets stop at the nesting bound with the line, not in a RecursionError traceback."""
    line = single_problem(write(tmp_path, "model:\n  config:\n    x: " + "[" * 20000 + "]" * 20000 + "\n"))
    assert "nested more than" in line and ":3:" in line


def test_oversized_file_is_refused_before_it_is_parsed(tmp_path):
    """A file over the size bound (a data file passed by mistake) is refused by its size."""
    line = single_problem(write(tmp_path, "# padding\n" * (MAX_JOB_BYTES // 10 + 1)))
    assert "larger than 1024 KiB" in line


def test_non_utf8_bytes_name_their_line(tmp_path):
    """Bytes that are not UTF-8 are one line naming the byte and its line."""
    line = single_problem(write(tmp_path, b"name: ok\ntraining:\n  lr: \xff\xfe\n"))
    assert "not UTF-8" in line and "0xff" in line and ":3:" in line


def test_control_characters_in_the_file_name_their_line(tmp_path):
    """A NUL or other control byte (valid UTF-8, not valid YAML) is one line naming the character and its line."""
    line = single_problem(write(tmp_path, "name: ok\ntraining:\n  lr: 0.1\x00\n"))
    assert "the character '\\x00' is not allowed" in line and ":3:" in line


def test_duplicate_key_names_both_lines(tmp_path):
    """A key written twice in one section is an error naming both lines, not a silent last-wins."""
    line = single_problem(write(tmp_path, "training:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n"))
    assert "training.lr" in line and "lines 2 and 4" in line


def test_merge_key_overrides_are_not_duplicates(tmp_path):
    """`<<: *defaults` with a key written beside it is YAML's documented override, not a duplicate."""
    path = write(tmp_path, "defaults: &defaults {steps: 5, lr: 0.01}\ntraining:\n  <<: *defaults\n  steps: 7\n")
    with pytest.raises(SpecError) as caught:  # `defaults` is not a section; the point is what is not reported
        load_spec(path)
    assert [problem.key for problem in caught.value.problems] == ["defaults"]


@pytest.mark.parametrize("content", ["", "# only a comment\n", "---\n"])
def test_empty_file_is_an_error_not_the_default_job(tmp_path, content):
    """An empty job file (or only comments) is refused instead of silently running the default job."""
    assert "the job file is empty" in single_problem(write(tmp_path, content))


@pytest.mark.parametrize(
    "key",
    [
        "training.lr",
        "training.weight_decay",
        "training.grad_clip",
        "modularity.lambda",
        "training.min_lr_ratio",
        "partitioner.delay_s",
        "resources.peak_tflops",
    ],
)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan"])
def test_non_finite_numbers_are_refused(key, value):
    """inf and nan are refused for every float field, from the file or from --set."""
    line = single_problem(TINY, [f"{key}={value}"])
    assert key in line and "finite number" in line


def test_model_config_values_must_be_finite(tmp_path):
    """A non-finite value in model.config (passed to the transformers config) is refused too."""
    line = single_problem(write(tmp_path, "model:\n  config:\n    layer_norm_epsilon: .inf\n"))
    assert ":3: model.config.layer_norm_epsilon: not a finite number" in line


@pytest.mark.parametrize(
    ("betas", "bad"),
    [("[1.0, 0.999]", "training.betas.0"), ("[0.9, -0.1]", "training.betas.1"), ("[0.9, 1.5]", "training.betas.1")],
)
def test_betas_are_each_in_zero_one(betas, bad):
    """AdamW's betas must each lie in [0, 1)."""
    assert bad in single_problem(TINY, [f"training.betas={betas}"])


def test_overrides_are_held_to_the_same_bounds():
    """--set values go through the bounded loader: an alias, deep nesting and an over-long key path are one line."""
    assert "nested more than" in single_problem(TINY, ["model.config.x=" + "[" * 20000])
    assert "not valid YAML" in single_problem(TINY, ["training.lr=*bomb"])
    assert "too long" in single_problem(TINY, ["a." * 40 + "b=1"])


def test_control_characters_in_keys_cannot_forge_error_lines(tmp_path):
    """A key holding a newline is shown escaped, so each problem stays one line."""
    line = single_problem(write(tmp_path, 'training:\n  "lr\\nxcm: run finished": 1\n'))
    assert "lr\\nxcm: run finished" in line


def test_a_huge_key_is_cut_in_its_error_line(tmp_path):
    """A 100 KB key (an explicit YAML key: plain ones stop at 1024 characters) is named by its start, so the error
    stays a readable line."""
    line = single_problem(write(tmp_path, "training:\n  ? " + "k" * 100_000 + "\n  : 1\n"))
    assert "...(cut): unknown key" in line and len(line) < 1000


def test_checkpoint_job_file_goes_through_the_same_bounds(tmp_path):
    """A checkpoint's job.yaml is loaded by load_spec on resume: an alias bomb in it is refused the same way."""
    import pyarrow.fs as pafs

    from orchestrator.train import checkpoint_store as store
    from orchestrator.train.resume import resume_spec

    checkpoint = tmp_path / "step-3"
    checkpoint.mkdir()
    (checkpoint / store.JOB).parent.mkdir(parents=True, exist_ok=True)
    (checkpoint / store.JOB).write_text(alias_bomb())
    with pytest.raises(SpecError, match="aliases expand to more than"):
        resume_spec(store.Located(filesystem=pafs.LocalFileSystem(), path=str(checkpoint), state=None))
