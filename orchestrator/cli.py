"""The ``xcm`` command line: one verb per user task; each parses, loads the spec and calls one function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.spec import DEFAULT_JOB, SpecError, load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xcm", description="Train modular language models on Ray + DeepSpeed, "
                                                             "tracked in MLflow.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    run = verbs.add_parser("run", help="run a job on a local Ray (or the cluster at RAY_ADDRESS)")
    run.add_argument("job", nargs="?", default=str(DEFAULT_JOB), help=f"job file (default {DEFAULT_JOB})")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec key, e.g. --set training.steps=100 (repeatable)")
    run.set_defaults(handler=_run)

    check = verbs.add_parser("check", help="validate job files without running them")
    check.add_argument("jobs", nargs="+", help="job files")
    check.set_defaults(handler=_check)

    args = parser.parse_args(argv)
    if args.verb is None:
        args = parser.parse_args(["run", *(argv or [])])
    try:
        return args.handler(args)
    except SpecError as error:
        print(error, file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from orchestrator import tracking
    from orchestrator.train.launch import run_job

    spec = load_spec(args.job, args.overrides)
    try:
        result = run_job(spec, Path.cwd())
    except tracking.TrackingUnavailable as error:
        print(f"xcm: {error}", file=sys.stderr)
        return 1
    print(f"\nxcm: run {result.run_id} finished")
    for key in ("task_loss", "clusterability"):
        if key in result.metrics:
            print(f"  final {key}: {result.metrics[key]:.4f}")
    if result.checkpoint_path:
        print(f"  checkpoint: {result.checkpoint_path}")
    print(f"  open the MLflow UI:  {tracking.ui_command(result.tracking_uri)}")
    print(f"  then the run:        {tracking.run_link(result.tracking_uri, result.experiment_id, result.run_id)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    failed = 0
    for job in args.jobs:
        try:
            load_spec(job)
            print(f"{job}: ok")
        except SpecError as error:
            print(error, file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
