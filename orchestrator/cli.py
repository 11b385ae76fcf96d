"""The ``xcm`` command line: one verb per user task; each parses, loads the spec and calls one function."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from orchestrator import cluster_jobs, credentials, metric_names
from orchestrator.cluster_jobs import ClusterError
from orchestrator.credentials import CredentialError, redact
from orchestrator.spec import CIRCUIT_TASK_FORMS, DEFAULT_JOB, INVALID_JOB_EXIT_CODE, SpecError


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command itself (the `xcm` script, `python -m orchestrator.cli`), not a caller in Python
        skip_the_final_garbage_collection()
    parser = argparse.ArgumentParser(
        prog="xcm", description="Train modular language models on Ray + DeepSpeed, tracked in MLflow."
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    run = verbs.add_parser("run", help="run a job on a local Ray (or the cluster at RAY_ADDRESS)")
    run.add_argument("job", nargs="?", default=str(DEFAULT_JOB), help=f"job file (default {DEFAULT_JOB})")
    _add_overrides(run, "override a spec key, e.g. --set training.steps=100 (repeatable)")
    _add_verbose(run)
    run.set_defaults(handler=_run)

    check = verbs.add_parser("check", help="validate job files without running them")
    check.add_argument("jobs", nargs="+", help="job files")
    check.set_defaults(handler=_check)

    _add_cluster_verbs(verbs)
    _add_checkpoint_verbs(verbs)
    _add_measure_verb(verbs)
    _add_circuits_verb(verbs)
    _add_experiment_verbs(verbs)

    args = parser.parse_args(argv)
    if args.verb is None:
        args = parser.parse_args(["run", *(argv or [])])
    from orchestrator.train.checkpoint_store import CheckpointKeyError
    from orchestrator.train.launch import RunFailed

    if os.environ.get("RAY_ADDRESS"):  # a training command will join that cluster: with its token, as the verbs do
        cluster_jobs.use_token_when_available()
    try:
        _take_credentials(args)
        return args.handler(args)
    except SpecError as error:
        print(redact(str(error)), file=sys.stderr)
        return INVALID_JOB_EXIT_CODE
    except (ClusterError, CheckpointKeyError, CredentialError) as error:  # the key: run, resume, export, measure
        print(f"xcm: {redact(str(error))}", file=sys.stderr)
        return 1
    except RunFailed:  # the run's own lines have said why, where the whole error is and how to resume
        return 1


def skip_the_final_garbage_collection() -> None:
    """At exit, after every other exit handler (Ray's shutdown among them), freeze what the process holds: the
    interpreter's last garbage collection then skips the millions of objects of torch, transformers, MLflow and Ray,
    which took 3-4 s of every command's exit on 2 cores, more under load. Files and Ray are closed by then."""
    import atexit
    import gc

    atexit.register(gc.freeze)  # handlers run last-registered first: this one after those registered later


def _take_credentials(args: argparse.Namespace) -> None:
    """Credentials in a URI on the command line go into this process's environment, and the URI on without
    them (``orchestrator.credentials``)."""
    for name in ("target", "tracking_uri", "model"):
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, credentials.take(getattr(args, name)))


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, DeepSpeed's and the workers' output live (also XCM_VERBOSE=1); "
        "by default it goes to xcm.log in the run's directory",
    )


def _run(args: argparse.Namespace) -> int:
    """Train the job; the terminal shows xcm's lines, everything else goes to the run's log file
    (``orchestrator.console``). Ctrl-C stops it KILLED, with exit code 130 as for any interrupted command."""
    from orchestrator import tracking
    from orchestrator.train.job_checks import load_spec
    from orchestrator.train.launch import fail_submitted_run, run_job

    try:
        spec = load_spec(args.job, args.overrides, files_from=Path.cwd())
    except SpecError as error:
        fail_submitted_run(args.job, error)
        raise
    try:
        with _quiet_unless_verbose(args) as console:
            result = run_job(spec, Path.cwd(), console=console)
    except tracking.TrackingUnavailable as error:
        print(f"xcm: {redact(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    _print_result(result)
    return 0


@contextlib.contextmanager
def _quiet_unless_verbose(args: argparse.Namespace):
    """The terminal session of a training command (``orchestrator.console``): xcm's lines on the terminal, the
    rest in the run's log file, unless --verbose or XCM_VERBOSE; Ray is left before the session ends, so that its
    last forwarded lines land in the log, not after the summary."""
    from orchestrator.console import terminal_session, verbose_requested
    from orchestrator.spec import RUNS_DIRECTORY
    from orchestrator.train.launch import disconnect_ray

    with terminal_session(verbose_requested(args.verbose), Path.cwd() / RUNS_DIRECTORY / "logs") as console:
        try:
            yield console
        finally:
            disconnect_ray()


def _print_result(result) -> None:
    from orchestrator import tracking

    print(f"\nxcm: run {result.run_id} finished")
    for key in ("task_loss", "clusterability"):
        if key in result.metrics:
            print(f"  final {key}: {result.metrics[key]:.4f}")
    if result.checkpoint_path:
        print(f"  checkpoint: {result.checkpoint_path}")
    print(f"  open the MLflow UI:  {tracking.ui_command(result.tracking_uri)}")
    print(f"  then the run:        {tracking.run_link(result.tracking_uri, result.experiment_id, result.run_id)}")


def _add_overrides(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def _tracking_uri(given: str | None) -> str:
    """The tracking URI given on the command line, else the default job's store under this directory."""
    from orchestrator.spec import JobSpec

    return given or JobSpec().resolved(Path.cwd()).tracking.uri


def _check(args: argparse.Namespace) -> int:
    """Each job as `xcm run` would load it here (its data files included), with `xcm run`'s exit code."""
    from orchestrator.train.job_checks import load_spec

    failed = 0
    for job in args.jobs:
        try:
            load_spec(job, files_from=Path.cwd())
            print(f"{job}: ok")
        except SpecError as error:
            print(error, file=sys.stderr)
            failed += 1
    return INVALID_JOB_EXIT_CODE if failed else 0


def _add_checkpoint_verbs(verbs) -> None:
    """resume / export: a run's checkpoints, named by run directory, checkpoint or MLflow run id."""
    target_help = (
        "a run directory (xcm-runs/checkpoints/<job>-<run id>), one of its step-* checkpoints, or an MLflow run id"
    )
    store_help = "MLflow store to look a run id up in (default: ./xcm-runs/mlflow.db)"
    resume = verbs.add_parser(
        "resume",
        help="continue a run from a checkpoint (a run's newest intact one, or "
        "exactly the step-* named), same MLflow run",
    )
    resume.add_argument("target", help=target_help)
    _add_overrides(resume, "override a key of the run's spec, e.g. --set training.steps=200 (repeatable)")
    resume.add_argument("--tracking-uri", default=None, help=store_help)
    _add_verbose(resume)
    resume.add_argument(
        "--address",
        default=None,
        help="resume as a job on the Ray cluster at this dashboard address (http://HEAD:8265) "
        "instead of on this machine",
    )
    resume.set_defaults(handler=_resume)
    export = verbs.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    export.add_argument("target", help=target_help)
    export.add_argument("--to", choices=["hf"], required=True, help="format: hf (transformers save_pretrained)")
    export.add_argument("directory", help="output directory")
    export.add_argument("--tracking-uri", default=None, help=store_help)
    export.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it is not empty (only once the new export is complete)"
    )
    export.set_defaults(handler=_export)


def _resume(args: argparse.Namespace) -> int:
    from orchestrator import tracking
    from orchestrator.train.checkpointing import ResumeMismatch
    from orchestrator.train.resume import ResumeError, resume_job

    if args.address is not None:
        return _print_submission(
            cluster_jobs.submit_resume(args.target, args.overrides, args.tracking_uri, args.address)
        )
    try:
        with _quiet_unless_verbose(args) as console:
            result = resume_job(args.target, Path.cwd(), args.overrides, args.tracking_uri, console=console)
    except (ResumeError, ResumeMismatch, tracking.TrackingUnavailable) as error:
        print(f"xcm: {redact(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    _print_result(result)
    return 0


def _export(args: argparse.Namespace) -> int:
    from orchestrator.train.export import ExportError, export_hf
    from orchestrator.train.resume import ResumeError

    uri = _tracking_uri(args.tracking_uri)
    try:
        directory = export_hf(args.target, Path(args.directory), uri, overwrite=args.overwrite)
    except (ResumeError, ExportError) as error:
        print(f"xcm: {redact(str(error))}", file=sys.stderr)
        return 1
    print(f"xcm: exported to {directory} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def _add_cluster_verbs(verbs) -> None:
    """submit / status / logs / stop / list / ui, in the spirit of `ray job`."""

    def with_address(verb):
        verb.add_argument(
            "--address",
            default=None,
            help="Ray dashboard address (default: RAY_ADDRESS if it is http://..., else http://127.0.0.1:8265)",
        )
        return verb

    submit = with_address(verbs.add_parser("submit", help="submit a job to a Ray cluster through Ray's Jobs API"))
    submit.add_argument("job", help="job file")
    _add_overrides(submit, "override a spec key (repeatable)")
    submit.set_defaults(handler=_submit)
    status = with_address(verbs.add_parser("status", help="a submitted job's status (the newest when omitted)"))
    status.add_argument("job_id", nargs="?")
    status.set_defaults(handler=_status)
    logs = with_address(verbs.add_parser("logs", help="a submitted job's logs"))
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(handler=_logs)
    stop = with_address(verbs.add_parser("stop", help="stop a submitted job (its MLflow run ends KILLED)"))
    stop.add_argument("job_id")
    stop.set_defaults(handler=_stop)
    listing = with_address(verbs.add_parser("list", help="the cluster's jobs"))
    listing.set_defaults(handler=_list)
    ui = verbs.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for a job's tracking store")
    ui.add_argument("job", nargs="?", default=str(DEFAULT_JOB), help=f"job file (default {DEFAULT_JOB})")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(handler=_ui)


def _address(args: argparse.Namespace) -> str:
    import os

    environment = os.environ.get("RAY_ADDRESS", "")
    return args.address or (
        environment if environment.startswith(("http://", "https://")) else cluster_jobs.DEFAULT_ADDRESS
    )


def _submit(args: argparse.Namespace) -> int:
    return _print_submission(cluster_jobs.submit(args.job, args.overrides, _address(args), Path.cwd()))


def _print_submission(submission) -> int:
    address = redact(submission.address)
    print(f"xcm: submitted job {submission.job_id} to {address}")
    print(f"  MLflow run: {submission.run_link}")
    print(f"  follow it:  xcm logs {submission.job_id} --follow --address {address}")
    return 0


def _status(args: argparse.Namespace) -> int:
    job_id = args.job_id
    if job_id is None:
        jobs = cluster_jobs.list_jobs(_address(args))
        if not jobs:
            print("xcm: no jobs on this cluster")
            return 0
        job_id = jobs[-1]["job_id"]
    info = cluster_jobs.status(_address(args), job_id)
    print(redact(f"{info['job_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else "")))
    if info["run_id"]:
        print(f"  MLflow run {info['run_id']} in {redact(info['tracking_uri'])}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    import asyncio

    if not args.follow:
        print(cluster_jobs.logs(_address(args), args.job_id), end="")
        return 0

    async def follow() -> None:
        async for lines in cluster_jobs.follow_logs(_address(args), args.job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    return 0


def _stop(args: argparse.Namespace) -> int:
    stopped = cluster_jobs.stop(_address(args), args.job_id)
    print(f"xcm: {'stopping' if stopped else 'already finished:'} {args.job_id}")
    return 0


def _list(args: argparse.Namespace) -> int:
    for job in cluster_jobs.list_jobs(_address(args)):
        print(f"{job['job_id']:<40} {job['status']:<10} {job['run_id']}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    """Replace this process with the MLflow UI for the job's store (a server URI is already a UI)."""
    import os

    from orchestrator import tracking
    from orchestrator.train.job_checks import load_spec

    spec = load_spec(args.job).resolved(Path.cwd())
    uri = spec.tracking.uri
    if uri.startswith(("http://", "https://")):
        print(f"xcm: {credentials.strip(uri)} is a tracking server: open it in a browser")
        return 0
    print(f"xcm: MLflow UI for {uri} on http://127.0.0.1:{args.port}", flush=True)
    tracking.prepare_local_store(uri)
    os.execvp("mlflow", ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)])
    return 1


def _add_measure_verb(verbs) -> None:
    measure = verbs.add_parser("measure", help="clusterability of any model's MLP matrices under four partitions")
    _add_model_argument(measure)
    measure.add_argument("--k", default="4", help="clusters: 4, a sweep 2..20, or a list 2,4,8 (default 4)")
    measure.add_argument(
        "--matrices",
        nargs="+",
        choices=["mlp_in", "mlp_out"],
        default=["mlp_in", "mlp_out"],
        help="which MLP matrices (default both)",
    )
    measure.add_argument("--seed", type=int, default=0, help="seed of the spectral and random partitions")
    _add_tracking_options(measure, "xcm-measure")
    measure.set_defaults(handler=_measure)


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The model `measure` and `circuits` take, in every form ``measure.load_model`` reads."""
    parser.add_argument(
        "model",
        help="a save_pretrained directory, an xcm checkpoint (run directory, step-* "
        "checkpoint or MLflow run id), or a Hugging Face hub name",
    )


def _add_tracking_options(parser: argparse.ArgumentParser, experiment: str) -> None:
    """Where a verb that logs its results as an MLflow run logs them, and looks run ids up."""
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store for the results and for run-id lookups (default ./xcm-runs/mlflow.db)",
    )
    parser.add_argument("--experiment", default=experiment, help=f"MLflow experiment (default {experiment})")


def _measure(args: argparse.Namespace) -> int:
    from orchestrator import measure, tracking
    from orchestrator.train.export import ExportError
    from orchestrator.train.resume import ResumeError

    try:
        k_values = measure.parse_k(args.k)
    except ValueError as error:
        print(f"xcm: {error}", file=sys.stderr)
        return 2
    uri = _tracking_uri(args.tracking_uri)
    try:
        model = measure.load_model(args.model, uri)
    except (OSError, ResumeError, ExportError) as error:
        print(redact(f"xcm: cannot load {args.model!r}: {error}"), file=sys.stderr)
        return 1
    measurements = measure.measure_model(model, k_values, args.matrices, args.seed)
    print(measure.format_table(measurements))
    try:
        run_id = measure.log_measurements(measurements, args.model, uri, args.experiment, Path.cwd())
    except tracking.TrackingUnavailable as error:
        print(f"xcm: {redact(str(error))}", file=sys.stderr)
        return 1
    print(f"\nxcm: logged to MLflow run {run_id} (experiment {args.experiment}) in {uri}")
    return 0


def _add_circuits_verb(verbs) -> None:
    circuits = verbs.add_parser(
        "circuits",
        help="circuit sizes and locality per task, and how task-specialised the "
        "clusters are, for a checkpoint, run id or model directory",
    )
    _add_model_argument(circuits)
    circuits.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        metavar="SPEC",
        help=f"{CIRCUIT_TASK_FORMS} (files under the current directory); default: the model's own tasks",
    )
    circuits.add_argument(
        "--method",
        choices=["greedy", "attribution", "specialization", "all"],
        default="all",
        help="greedy (small classifiers), attribution, specialization, or all the model supports",
    )
    circuits.add_argument(
        "--k",
        type=int,
        default=4,
        help="clusters of the fresh spectral partition, for a model without a partition of its own",
    )
    circuits.add_argument("--taus", default="0.8,0.9,0.95,1.0", help="attribution's faithfulness levels")
    circuits.add_argument("--ig-steps", type=int, default=8, help="attribution's integrated-gradient steps")
    circuits.add_argument(
        "--ablation", choices=["zero", "mean"], default="zero", help="cluster ablation to zero or to the mean"
    )
    circuits.add_argument("--null-draws", type=int, default=20, help="random partitions for the index's null")
    circuits.add_argument("--max-examples", type=int, default=2000, help="examples per task before the split")
    circuits.add_argument(
        "--examples",
        choices=["held_out", "train", "auto"],
        help="a classifier checkpoint's examples for its label tasks; default: its job's circuits.examples",
    )
    circuits.add_argument(
        "--eval-on-find-data",
        action="store_true",
        help="judge circuits on the examples that found them, as the papers do",
    )
    circuits.add_argument("--seed", type=int, default=0, help="seed of the find/judge split and the null")
    _add_tracking_options(circuits, metric_names.CIRCUITS_EXPERIMENT)
    circuits.set_defaults(handler=_circuits)


def _circuits(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from orchestrator.circuit_command import run_circuits_command
    from orchestrator.spec import CircuitsSpec

    try:
        options = CircuitsSpec.model_validate(
            {
                "method": args.method,
                "taus": [part for part in args.taus.split(",") if part.strip()],
                "ig_steps": args.ig_steps,
                "ablation": args.ablation,
                "null_draws": args.null_draws,
                "max_examples": args.max_examples,
                "eval_on_find_data": args.eval_on_find_data,
                "seed": args.seed,
            }
        )
    except ValidationError as error:
        problem = error.errors()[0]
        print(f"xcm: --{str(problem['loc'][0]).replace('_', '-')}: {problem['msg']}", file=sys.stderr)
        return 2
    if args.k < 2:
        print(f"xcm: --k {args.k}: give at least 2 clusters", file=sys.stderr)
        return 2
    return run_circuits_command(
        args.model,
        args.tasks,
        options,
        args.k,
        _tracking_uri(args.tracking_uri),
        args.experiment,
        examples=args.examples,
    )


def _add_experiment_verbs(verbs) -> None:
    """experiment / sweep: variants × seeds as Ray Tune trials, compared against a control in one MLflow run."""
    experiment = verbs.add_parser(
        "experiment",
        help="run an experiment file's variants × seeds as Ray Tune trials "
        "and write the comparison into one parent MLflow run",
    )
    experiment.add_argument("file", nargs="?", help="experiment file (jobs/experiments/*.yaml)")
    _add_overrides(experiment, "override a key of every trial's job, e.g. --set training.steps=100 (repeatable)")
    experiment.add_argument(
        "--report",
        metavar="PARENT_RUN_ID",
        default=None,
        help="rebuild the comparison of a finished experiment from MLflow alone",
    )
    experiment.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store of the parent run, for --report (default: ./xcm-runs/mlflow.db)",
    )
    experiment.set_defaults(handler=_experiment)
    sweep = verbs.add_parser(
        "sweep",
        help="run a grid of job keys × seeds as Ray Tune trials, compared against "
        "the grid's modularity.lambda=0 points",
    )
    sweep.add_argument("job", help="job file")
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2,...",
        help="a job key and its values, e.g. --grid modularity.lambda=0,5,20 (repeatable)",
    )
    sweep.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per grid point (default 3)")
    sweep.add_argument("--max-failures", type=int, default=1, help="Ray Tune's retries of a failed trial")
    _add_overrides(sweep, "override a key of every trial's job (repeatable)")
    sweep.set_defaults(handler=_sweep)


def _experiment(args: argparse.Namespace) -> int:
    from orchestrator.experiments.plan import load_experiment

    if args.report is not None:
        return _rebuild_report(args.report, args.tracking_uri)
    if args.file is None:
        print("xcm: name an experiment file (jobs/experiments/*.yaml), or --report PARENT_RUN_ID", file=sys.stderr)
        return INVALID_JOB_EXIT_CODE
    return _run_experiment(load_experiment(args.file, args.overrides))


def _sweep(args: argparse.Namespace) -> int:
    from orchestrator.experiments.plan import build_sweep

    plan = build_sweep(args.job, args.grid, args.seeds, args.overrides, args.max_failures)
    if not any(plan.controls.values()):
        print("xcm: the grid has no modularity.lambda=0 point: no control, the report is unpaired", file=sys.stderr)
    return _run_experiment(plan)


def _run_experiment(plan) -> int:
    from orchestrator import tracking
    from orchestrator.experiments.tuning import run_experiment

    try:
        result = run_experiment(plan, Path.cwd())
    except tracking.TrackingUnavailable as error:
        print(f"xcm: {redact(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # run_experiment has ended the stopped trials' runs and the parent KILLED
        print("xcm: experiment stopped (Ctrl-C); its unfinished runs are KILLED in MLflow", file=sys.stderr)
        return 130
    print(result.report.markdown)
    print(
        f"xcm: experiment run {result.parent_run_id}: {len(plan.trials) - len(result.failed_trials)} of "
        f"{len(plan.trials)} trials finished; the comparison is in its artifacts under comparison/"
    )
    print(
        f"  then the run:        {tracking.run_link(result.tracking_uri, result.experiment_id, result.parent_run_id)}"
    )
    if result.failed_trials:
        print(f"xcm: failed after their retries: {', '.join(result.failed_trials)}", file=sys.stderr)
        return 1
    return 0


def _rebuild_report(parent_run_id: str, tracking_uri: str | None) -> int:
    from orchestrator import tracking
    from orchestrator.experiments.report import write_report

    uri = _tracking_uri(tracking_uri)
    try:
        report = write_report(tracking.client(uri), parent_run_id)
    except Exception as error:  # mlflow raises several types for a missing run or artifact
        print(
            redact(
                f"xcm: cannot rebuild the report of run {parent_run_id} from {uri}: "
                f"{type(error).__name__}: {error}. Pass the experiment's parent run id, and --tracking-uri "
                "for the store it is in"
            ),
            file=sys.stderr,
        )
        return 1
    print(report.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
