"""Run an experiment's trials on Ray Tune: each (variant, seed) one xcm training run, a child of one MLflow run.

Tune schedules, retries and tabulates the trials; each trial is a function trainable that trains its job
through ``run_job``, the path of ``xcm run``: a Ray Train run of its own, started from inside the trial (Ray
Train v2 runs inside a Tune trial this way). Tune does not see the resources the Train run asks for, so the
trial itself reserves no CPU (``_TRIAL_RESOURCES``) and ``max_concurrent_trials`` is what keeps the running
trials within the cluster: as many as its CPUs and GPUs hold at once, one at a time on a laptop.

A trial that fails (its Ray Train run gives up, the trial's process dies) is retried by Tune up to the
experiment's ``max_failures``: the first thing a trial does is create its child MLflow run and report that run's
id to Tune as the trial's checkpoint, so the retry finds the run and continues it as ``xcm resume`` would, from
its newest intact xcm checkpoint (or from the start, into the same run, when none was written yet).

Ctrl-C stops Tune, which ends the running trials' processes (and with them their Ray Train runs) before their
child runs are ended, and reports those trials as finished: so when Tune returns, a child run still RUNNING is
ended here, KILLED when its trial did not fail (it was stopped) and the parent run then ends KILLED too, FAILED
when its trial failed after its retries (its process died before it could say so).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator import credentials, tracking
from orchestrator.experiments import report as reporting
from orchestrator.experiments.plan import ExperimentPlan
from orchestrator.spec import JobSpec

logger = logging.getLogger(__name__)

_RUN_ID_FILE = "mlflow_run.json"  # the trial's Tune checkpoint: which child run it trains
# The trial's own process only waits for its Ray Train run: it reserves no CPU (a CPU would leave a 2-CPU machine
# one short for the run's two workers, and the trial would wait forever). Tune refuses a request of nothing,
# so it asks for one byte of memory.
_TRIAL_RESOURCES = {"cpu": 0, "memory": 1}
PREVIOUS_FAILURE_TAG = "xcm.previous_failure"  # on a child run a retry continued: why the attempt before failed


@dataclass(frozen=True)
class ExperimentResult:
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    failed_trials: list[str]  # trial keys (variant-sSEED) that did not finish after their retries
    report: reporting.Report


def run_experiment(plan: ExperimentPlan, workdir: Path) -> ExperimentResult:
    """Create the parent run, run every trial through Tune, then write the comparison into the parent run."""
    from orchestrator.train.launch import ending_run, ensure_ray

    specs = {trial.key: credentials.take_from_spec(trial.spec)[0].resolved(workdir) for trial in plan.trials}
    first = next(iter(specs.values()))
    uri = first.tracking.uri
    parent_run_id = tracking.start_run(first.tracking, plan.name, plan.params)
    client = tracking.client(uri)
    with ending_run(uri, parent_run_id):
        client.set_tag(parent_run_id, reporting.EXPERIMENT_TAG, plan.name)
        client.log_text(
            parent_run_id,
            reporting.plan_record(plan.variants, plan.controls, plan.seeds, plan.metrics),
            reporting.PLAN_ARTIFACT,
        )
        client.log_text(parent_run_id, plan.source, "experiment/experiment.yaml")
        ensure_ray(first)
        failed = _fit(plan, specs, parent_run_id, workdir)
        report = reporting.write_report(client, parent_run_id)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return ExperimentResult(parent_run_id, experiment_id, uri, failed, report)


def concurrent_trials(specs: list[JobSpec], cluster: dict[str, float]) -> int:
    """How many trials fit the cluster's resources at once (at least one): each needs its workers' CPUs and GPUs
    and its partitioner actors'."""
    fits = math.inf
    for spec in specs:
        workers, actors = spec.resources, spec.partitioner
        cpus = workers.max_workers * workers.cpus_per_worker + actors.actors * actors.cpus
        gpus = workers.max_workers * workers.gpus_per_worker + actors.actors * actors.gpus
        if cpus > 0:
            fits = min(fits, cluster.get("CPU", 0) // cpus)
        if gpus > 0:
            fits = min(fits, cluster.get("GPU", 0) // gpus)
    return max(1, int(fits if math.isfinite(fits) else 1))


def _fit(plan: ExperimentPlan, specs: dict[str, JobSpec], parent_run_id: str, workdir: Path) -> list[str]:
    import ray
    from ray import tune

    trials = {
        trial.key: {
            "variant": trial.variant,
            "seed": trial.seed,
            "spec": specs[trial.key].model_dump(mode="json", by_alias=True),
        }
        for trial in plan.trials
    }
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, trials=trials, parent_run_id=parent_run_id, workdir=str(workdir)),
        _TRIAL_RESOURCES,
    )
    first = next(iter(specs.values()))
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(trials))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent_trials(list(specs.values()), ray.cluster_resources())
        ),
        run_config=tune.RunConfig(
            name=f"experiment-{plan.name}-{parent_run_id}",
            storage_path=first.checkpointing.storage_path,
            failure_config=tune.FailureConfig(max_failures=plan.max_failures),
            verbose=1,
        ),
    )
    try:
        results = tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C, while Tune stops the trials
        _end_unended_children(first.tracking.uri, parent_run_id, trials, failed=[])
        raise
    failed = sorted(result.config["trial"] for result in results if result.error is not None)
    if _end_unended_children(first.tracking.uri, parent_run_id, trials, failed):
        raise KeyboardInterrupt
    return failed


STOPPED_REASON = "xcm experiment was stopped (Ctrl-C) before this trial ended"
DIED_REASON = "the trial's process ended without ending its run, and Tune's retries are spent"


def _end_unended_children(uri: str, parent_run_id: str, trials: dict, failed: list[str]) -> bool:
    """End every child run still RUNNING once Tune has stopped the trials: FAILED for a trial that failed, else
    KILLED. True when a trial was stopped before its end: one still RUNNING or never started."""
    client = tracking.client(uri)
    parent = client.get_run(parent_run_id)
    children = {
        (run.data.tags.get(reporting.VARIANT_TAG), run.data.tags.get(reporting.SEED_TAG)): run
        for run in client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{reporting.PARENT_TAG}` = '{parent_run_id}'",
            max_results=5000,
        )
    }
    stopped = False
    for key, trial in trials.items():
        run = children.get((trial["variant"], str(trial["seed"])))
        unended = run is None or run.info.status == "RUNNING"
        stopped |= unended and key not in failed
        if run is not None and unended:
            reason, status = (DIED_REASON, "FAILED") if key in failed else (STOPPED_REASON, "KILLED")
            logger.warning("trial %s: MLflow run %s ends %s: %s", key, run.info.run_id, status, reason)
            tracking.fail_run(uri, run.info.run_id, reason, status)
    return stopped


def run_trial(config: dict, trials: dict, parent_run_id: str, workdir: str) -> None:
    """One Tune trial: train its job into its child MLflow run, or continue that run on a retry."""
    from ray import tune

    from orchestrator.train.launch import run_job

    trial = trials[config["trial"]]
    spec = JobSpec.model_validate(trial["spec"])
    uri = spec.tracking.uri
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_id = _start_child_run(spec, parent_run_id, trial["variant"], trial["seed"])
        _report_run_id(run_id)
        run_job(_in_run(spec, run_id), Path(workdir))
    else:
        with checkpoint.as_directory() as directory:
            run_id = json.loads((Path(directory) / _RUN_ID_FILE).read_text())["run_id"]
        logger.warning("trial %s is retried: continuing MLflow run %s", config["trial"], run_id)
        _keep_failure_as_previous(uri, run_id)
        _continue_run(_in_run(spec, run_id), Path(workdir))
    final = tracking.client(uri).get_run(run_id).data.metrics
    tune.report({key: value for key, value in final.items() if reporting.compared(key)})


def _start_child_run(spec: JobSpec, parent_run_id: str, variant: str, seed: int) -> str:
    run_id = tracking.start_run(spec.tracking, spec.name, spec.flat_params(), job=spec)
    client = tracking.client(spec.tracking.uri)
    for key, value in (
        (reporting.PARENT_TAG, parent_run_id),
        (reporting.VARIANT_TAG, variant),
        (reporting.SEED_TAG, str(seed)),
    ):
        client.set_tag(run_id, key, value)
    return run_id


def _report_run_id(run_id: str) -> None:
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="xcm-trial-") as directory:
        (Path(directory) / _RUN_ID_FILE).write_text(json.dumps({"run_id": run_id}))
        tune.report({"mlflow_run_id": run_id}, checkpoint=tune.Checkpoint.from_directory(directory))


def _keep_failure_as_previous(uri: str, run_id: str) -> None:
    """The failed attempt's reason moves to ``xcm.previous_failure``: a run that the retry finishes must not
    carry a failure tag, and the reason stays readable."""
    client = tracking.client(uri)
    reason = client.get_run(run_id).data.tags.get(tracking.FAILURE_TAG)
    if reason is not None:
        client.set_tag(run_id, PREVIOUS_FAILURE_TAG, reason)
        client.delete_tag(run_id, tracking.FAILURE_TAG)


def _in_run(spec: JobSpec, run_id: str) -> JobSpec:
    return spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"run_id": run_id})})


def _continue_run(spec: JobSpec, workdir: Path) -> None:
    """A retried trial's run, as ``xcm resume`` continues it: from its newest intact checkpoint; from the start
    when it wrote none; nothing left to train when that checkpoint is its last step."""
    from orchestrator.train.launch import run_job
    from orchestrator.train.resume import ResumeError, locate, resume_job

    uri, run_id = spec.tracking.uri, spec.tracking.run_id
    try:
        located = locate(run_id, uri)
    except ResumeError as error:
        logger.warning("run %s has no checkpoint to continue from (%s): training it from the start", run_id, error)
        run_job(spec, workdir)
        return
    if located.state.step >= spec.training.steps:
        tracking.end_run(uri, run_id, "FINISHED")
        return
    resume_job(located.uri, workdir, tracking_uri=uri)
