"""Experiment files and sweep grids: every shipped file loads, every trial's job is checked before anything
starts, and bad input is one line per problem."""

from pathlib import Path

import pytest

from orchestrator.experiments.plan import build_sweep, load_experiment
from orchestrator.experiments.tuning import concurrent_trials
from orchestrator.spec import JobSpec, SpecError

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((ROOT / "jobs" / "experiments").glob("*.yaml"))
SUPPLEMENTS = sorted((ROOT / "jobs" / "supplements").glob("*.yaml"))  # more seeds for one
TINY = ROOT / "jobs" / "tiny.yaml"


@pytest.mark.parametrize(
    ("experiment", "min_seeds"),
    [(path, 3) for path in EXPERIMENTS] + [(path, 1) for path in SUPPLEMENTS],
    ids=lambda value: value.name if isinstance(value, Path) else None,
)
def test_every_shipped_experiment_file_loads(experiment, min_seeds, monkeypatch):
    """Every file in jobs/experiments/ loads with a control at λ = 0 and 3 seeds (a supplement, which adds seeds
    to an experiment already run, at least 1); offline, those on the GPU jobs fail only on the hub model missing
    from the local cache, or the chemistry corpus missing from this checkout."""
    monkeypatch.chdir(ROOT)
    try:
        plan = load_experiment(experiment)
    except SpecError as error:
        offline = [p for p in error.problems if "not in the local cache" in p.message or p.key.endswith("data.files")]
        assert offline == error.problems, error  # noqa: PT017 - valid or failing on this alone
        return
    assert plan.controls["control"] is None and len(plan.seeds) >= min_seeds
    control = [trial.spec for trial in plan.trials if trial.variant == "control"]
    assert control and all(spec.modularity.lambda_ == 0 for spec in control)
    assert any(trial.spec.modularity.lambda_ > 0 for trial in plan.trials)


def test_cpu_sized_vision_experiments_train_on_digits(monkeypatch):
    """The CPU-sized MNIST and CIFAR experiments read scikit-learn's digits, offline."""
    monkeypatch.chdir(ROOT)
    for name in ("mnist_mlp_digits.yaml", "cifar_cnn_digits.yaml"):
        plan = load_experiment(ROOT / "jobs" / "experiments" / name)
        assert {trial.spec.data.source for trial in plan.trials} == {"digits"}


def write(tmp_path: Path, text: str, name: str = "experiment.yaml") -> Path:
    (tmp_path / "jobs" / "experiments").mkdir(parents=True, exist_ok=True)
    (tmp_path / "jobs" / "tiny.yaml").write_text(TINY.read_text())
    path = tmp_path / "jobs" / "experiments" / name
    path.write_text(text)
    return path


def test_seeds_set_training_and_partition_seeds_and_keep_the_data(tmp_path, monkeypatch):
    """Each (variant, seed) is a job of its own: both seeds set, the data seed kept, one name each."""
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path,
        "base: ../tiny.yaml\noverrides: {training.steps: 7, data.seed: 5}\n"
        "variants:\n  control: {modularity.lambda: 0}\n  strong: {modularity.lambda: 40.5}\n"
        "seeds: [3, 11]\n",
    )
    plan = load_experiment(path)
    assert [(t.variant, t.seed) for t in plan.trials] == [
        ("control", 3),
        ("control", 11),
        ("strong", 3),
        ("strong", 11),
    ]
    for trial in plan.trials:
        assert isinstance(trial.spec, JobSpec) and trial.spec.training.steps == 7
        assert trial.spec.training.seed == trial.spec.modularity.seed == trial.seed
        assert trial.spec.data.seed == 5
    assert [t.spec.modularity.lambda_ for t in plan.trials] == [0, 0, 40.5, 40.5]
    assert len({t.spec.name for t in plan.trials}) == 4
    assert plan.controls == {"control": None, "strong": "control"}
    assert plan.params["experiment.variants.strong.modularity.lambda"] == "40.5"


def test_inline_job_is_checked_like_a_job_file(tmp_path, monkeypatch):
    """A job written inline trains like its file would; a bad key in it is named with its variant."""
    monkeypatch.chdir(tmp_path)
    plan = load_experiment(
        write(
            tmp_path,
            "job: {name: inline, training: {steps: 5}}\nvariants: {control: {modularity.lambda: 0}}\nseeds: [0]\n",
        )
    )
    assert plan.trials[0].spec.training.steps == 5 and plan.name == "experiment"
    with pytest.raises(SpecError) as caught:
        load_experiment(
            write(
                tmp_path, "job: {name: inline}\nvariants: {control: {modularity.lambda: 0}, bad: {training.stepz: 3}}\n"
            )
        )
    assert [p.key for p in caught.value.problems] == ["variants.bad: training.stepz"]


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("base: ../tiny.yaml\nvariants: {clustered: {modularity.lambda: 20}}\n", "variants", "no variant named"),
        ("base: ../tiny.yaml\nvariants: {control: {modularity.k: 2}}\n", "variants.control", "λ = 20"),
        ("base: ../../../etc/passwd\nvariants: {control: {modularity.lambda: 0}}\n", "base", "outside"),
        ("job: {name: x}\nbase: ../tiny.yaml\nvariants: {control: {modularity.lambda: 0}}\n", "base", "either"),
        ("base: ../tiny.yaml\nvariants: {control: {modularity.lambda: 0}}\nseeds: [1, 1]\n", "seeds", "distinct"),
        ("base: ../tiny.yaml\nvariants: {control: {modularity.lambda: 0}}\nseedz: [1]\n", "seedz", "unknown key"),
        (
            "base: ../tiny.yaml\nbase: ../tiny.yaml\nvariants: {control: {modularity.lambda: 0}}\n",
            "base",
            "written twice",
        ),
        (
            "base: ../tiny.yaml\nvariants: {control: {modularity.lambda: 0}, other: {tracking.experiment: x}}\n",
            "variants",
            "different MLflow stores",
        ),
    ],
)
def test_bad_experiment_files_are_refused_with_the_key_and_a_fix(tmp_path, monkeypatch, text, key, words):
    """A missing control, a control that trains with the loss, a base outside the jobs directory, a duplicate
    key...: SpecError naming the key, one line per problem, nothing run."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as caught:
        load_experiment(write(tmp_path, text))
    assert [p.key for p in caught.value.problems] == [key], caught.value
    assert words in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_alias_bomb_stops_at_the_job_file_bounds(tmp_path, monkeypatch):
    """An experiment file is held to a job file's bounds: nested aliases are refused before they expand."""
    monkeypatch.chdir(tmp_path)
    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    with pytest.raises(SpecError, match="aliases expand"):
        load_experiment(write(tmp_path, "\n".join(levels) + "\nvariants: {control: *a8}\n"))


def test_sweep_pairs_each_point_with_its_lambda_zero_point(tmp_path, monkeypatch):
    """A λ × k grid: each clustered point's control is the λ = 0 point of the same k; a grid without λ has none."""
    monkeypatch.chdir(ROOT)
    plan = build_sweep(TINY, ["modularity.lambda=0,20", "modularity.k=2,4"], 2, ["training.steps=5"])
    assert plan.controls == {
        "lambda0_k2": None,
        "lambda0_k4": None,
        "lambda20_k2": "lambda0_k2",
        "lambda20_k4": "lambda0_k4",
    }
    assert len(plan.trials) == 8 and {t.spec.training.steps for t in plan.trials} == {5}
    assert {(t.variant, t.spec.modularity.k, t.spec.modularity.lambda_) for t in plan.trials if t.seed == 1} == {
        ("lambda0_k2", 2, 0),
        ("lambda0_k4", 4, 0),
        ("lambda20_k2", 2, 20),
        ("lambda20_k4", 4, 20),
    }
    unpaired = build_sweep(TINY, ["modularity.k=2,4"], 1)
    assert set(unpaired.controls.values()) == {None}


@pytest.mark.parametrize(
    "grid",
    [
        ["modularity.lambda"],
        ["modularity.lambda=0,,2"],
        ["=1,2"],
        ["modularity.lambda=0,1", "modularity.lambda=3"],
        ["modularity.lambda=-1"],
    ],
)
def test_bad_grids_are_refused(grid, monkeypatch):
    """A grid axis without values, an empty value, a key given twice, or a value the job refuses: SpecError."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SpecError):
        build_sweep(TINY, grid, 1)


def test_concurrent_trials_fit_the_cluster():
    """One trial at a time on 2 CPUs for 2 one-CPU workers; 4 on 8; GPUs bound it on a GPU cluster."""
    spec = JobSpec()
    assert concurrent_trials([spec], {"CPU": 2}) == 1
    assert concurrent_trials([spec], {"CPU": 1}) == 1  # never zero: the trial waits for its workers
    assert concurrent_trials([spec], {"CPU": 8}) == 4
    gpu = JobSpec.model_validate({"resources": {"num_workers": 4, "gpus_per_worker": 1}})
    assert concurrent_trials([gpu], {"CPU": 64, "GPU": 8}) == 2
