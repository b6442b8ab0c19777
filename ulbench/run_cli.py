"""`ulbench run`, `check`, `baseline` and `ls suites|metrics`: the suite runner's command line."""
from __future__ import annotations

import argparse
from pathlib import Path

from ulbench.errors import UserError

RUN_EXAMPLES = """examples:
  ulbench run suites/smoke.yaml                          # train + evaluate, into runs/smoke/<timestamp>/
  ulbench run suites/smoke.yaml --name ci                # into runs/smoke/ci/
  ulbench run suites/fashion-mnist.yaml --dry-run        # the plan: methods, budgets, FLOPs, estimated wall time
  ulbench run suites/imagenet512.yaml --set dataset.path=/data/imagenet/train --set device=cuda
  ulbench run --resume runs/smoke/ci                     # continue a killed sweep; finished points are kept"""
CHECK_EXAMPLES = """examples:
  ulbench check runs/smoke/ci --baseline reports/baselines/smoke.json   # exit 1 and a diff table on regression"""
BASELINE_EXAMPLES = """examples:
  ulbench baseline runs/smoke/ci -o reports/baselines/smoke.json   # measured values + default tolerances"""


def cmd_run(args) -> None:
    from ulbench.sweep import resume_run, start_run

    if args.resume:
        if args.suite or args.set or args.name:
            raise UserError("--resume RUN takes the suite and settings stored in RUN/config.json; drop SUITE, "
                            "--set and --name")
        run_dir = resume_run(args.resume, progress=not args.no_progress)
    elif args.suite is None:
        raise UserError("give a suite file (e.g. `ulbench run suites/smoke.yaml`) or --resume RUN")
    elif args.dry_run:
        _dry_run(args)
        return
    else:
        run_dir = start_run(args.suite, args.set, Path(args.runs_dir), args.name, progress=not args.no_progress)
    print(f"results: {run_dir / 'results.jsonl'}\nreport:  ulbench report {run_dir}")


def _dry_run(args) -> None:
    from ulbench.plan import estimate_times, format_plan, make_plan, resolve_device
    from ulbench.plan_gpu import format_gpu_plan, gpu_options
    from ulbench.suite import load_suite

    gpu = gpu_options(args.gpu, args.gpus, args.mfu)  # checked before anything is counted
    suite = load_suite(args.suite, args.set)
    plans = make_plan(suite)
    try:
        device = resolve_device(suite.device)
    except UserError:  # planning a GPU suite on a machine without one: estimate for this machine, and say so
        device = "cpu"
        print(f"note: the suite asks for device '{suite.device}', which this machine lacks; estimates are for cpu")
    if not args.no_timing:
        estimate_times(plans, device)
    print(format_plan(suite, plans, device))
    if gpu is not None:
        print(format_gpu_plan(suite, plans, gpu))
    print(f"(dry run: nothing trained; a run would write {Path(args.runs_dir) / suite.name}/<name>/)")


def cmd_check(args) -> int:
    from ulbench.check import compare, format_comparison

    passed, entries = compare(args.run, args.baseline)
    print(format_comparison(entries))
    print("check passed" if passed else f"check FAILED against {args.baseline}")
    return 0 if passed else 1


def cmd_baseline(args) -> None:
    from ulbench.check import write_baseline

    b = write_baseline(args.run, args.output)
    print(f"wrote {args.output}: {len(b['metrics'])} metrics from {args.run}")


def cmd_ls_suites(args) -> None:
    from ulbench.suite import list_suites

    for name, file, description in list_suites(Path(args.dir)):
        print(f"{name:16s} {file}  {description}")


def cmd_ls_metrics(args) -> None:
    from ulbench.suite import METRICS

    for m in METRICS.values():
        direction = {True: "higher is better", False: "lower is better", None: "two-sided"}[m.higher_is_better]
        print(f"{m.name:16s} {m.needs:16s} {direction:17s} {m.description}")


def register(sub, lsub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("run", help="run a suite: train methods along a FLOP ladder, evaluate at each rung",
                       description="Run a suite file (or resume a run directory).", epilog=RUN_EXAMPLES,
                       formatter_class=fmt)
    p.add_argument("suite", nargs="?", help="suite YAML file")
    p.add_argument("--resume", metavar="RUN", help="continue the sweep in this run directory")
    p.add_argument("--name", help="run directory name (default: a timestamp)")
    p.add_argument("--runs-dir", default="runs", help="root of run directories (default: runs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a suite key")
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimates; train nothing")
    p.add_argument("--no-timing", action="store_true", help="with --dry-run: skip the timed step (FLOPs only)")
    p.add_argument("--gpu", help="with --dry-run: plan in GPU-hours on this GPU (h100, h200, a100: dense bf16 peaks)")
    p.add_argument("--gpus", type=int, help="with --gpu: GPUs to divide the wall-clock hours by (default: 1)")
    p.add_argument("--mfu", type=float, help="with --gpu: model FLOP utilization, 0 < F <= 1 (default: 0.4, an "
                   "assumption; use what your own runs achieve)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check", help="compare a run with a baseline file; exit 1 on regression",
                       description="Regression check against reports/baselines/<suite>.json", epilog=CHECK_EXAMPLES,
                       formatter_class=fmt)
    p.add_argument("run")
    p.add_argument("--baseline", required=True)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("baseline", help="write a regression baseline file from a run", epilog=BASELINE_EXAMPLES,
                       description="Write a baseline (measured values, default tolerances) from a run.",
                       formatter_class=fmt)
    p.add_argument("run")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_baseline)
    p = lsub.add_parser("suites", help="suite files in a folder", description="List suite files with descriptions.",
                        epilog="examples:\n  ulbench ls suites\n  ulbench ls suites --dir my_suites/",
                        formatter_class=fmt)
    p.add_argument("--dir", default="suites")
    p.set_defaults(func=cmd_ls_suites)
    p = lsub.add_parser("metrics", help="metrics a suite can ask for", description="List metrics.",
                        epilog="examples:\n  ulbench ls metrics", formatter_class=fmt)
    p.set_defaults(func=cmd_ls_metrics)
