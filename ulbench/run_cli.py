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
  ulbench run --resume runs/smoke/ci                     # continue a killed sweep; finished points are kept
  torchrun --nproc-per-node 8 -m ulbench run suites/imagenet512.yaml --name main    # data-parallel, one node
  ulbench run suites/imagenet512.yaml --launcher slurm --nodes 8 --gpus-per-node 8 --partition gpu --wait"""
CHECK_EXAMPLES = """examples:
  ulbench check runs/smoke/ci --baseline reports/baselines/smoke.json   # exit 1 and a diff table on regression"""
BASELINE_EXAMPLES = """examples:
  ulbench baseline runs/smoke/ci -o reports/baselines/smoke.json   # measured values + default tolerances
  ulbench baseline runs/smoke/s0 -o reports/baselines/smoke.json --spread runs/smoke/s1 runs/smoke/s2
                                                                   # tolerances from the seed-to-seed spread"""


def cmd_run(args) -> int:
    import os

    from ul_model.train import DIST_TIMEOUT_ENV
    from ulbench.run.directory import create_run, load_run_plans, resume_run

    if args.dist_timeout is not None:
        if args.dist_timeout <= 0:
            raise UserError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
        os.environ[DIST_TIMEOUT_ENV] = str(args.dist_timeout)
    if (args.gpu or args.gpus or args.mfu) and not args.dry_run:
        raise UserError("--gpu, --gpus and --mfu plan GPU-hours with --dry-run; a run on GPUs takes "
                        "--set device=cuda (torchrun or --launcher slurm --gpus-per-node N)")
    if args.launcher not in ("local", "slurm"):
        raise UserError(f"--launcher {args.launcher}: choose local or slurm")
    if args.resume:
        if args.suite or args.set or args.name:
            raise UserError("--resume RUN takes the suite and settings stored in RUN/config.json; drop SUITE, "
                            "--set and --name")
        run_dir = Path(args.resume)
        if args.launcher == "slurm":
            load_run_plans(run_dir)  # a damaged or changed run fails here, before anything is submitted
    elif args.suite is None:
        raise UserError("give a suite file (e.g. `ulbench run suites/smoke.yaml`) or --resume RUN")
    elif args.dry_run:
        _dry_run(args)
        return 0
    else:
        run_dir = create_run(args.suite, args.set, Path(args.runs_dir), args.name)
    if args.launcher == "local":
        resume_run(run_dir, progress=not args.no_progress)
        print(f"results: {run_dir / 'results.jsonl'}\nreport:  ulbench report {run_dir}")
        return 0
    return _run_slurm(args, run_dir)


def _run_slurm(args, run_dir: Path) -> int:
    import json

    from ulbench.run.launch import SlurmOptions, format_status, run_status, submit_slurm, wait_for_jobs

    opts = SlurmOptions(partition=args.partition, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, time_min=args.time,
                        account=args.account, qos=args.qos)
    methods = list(json.loads((run_dir / "config.json").read_text())["methods"])
    jobs = submit_slurm(run_dir, methods, opts)
    for m, j in jobs.items():
        print(f"{m}: SLURM job {j['job_id']}, log {j['stderr']}")
    print(f"status:  ulbench status {run_dir}")
    if not args.wait:
        return 0
    ok = wait_for_jobs(run_dir, progress=not args.no_progress)
    print(format_status(run_dir, *run_status(run_dir)))
    return 0 if ok else 1


def cmd_status(args) -> None:
    from ulbench.run.launch import format_status, run_status

    rows, states = run_status(args.run)
    if args.json:
        import json

        print(json.dumps({"points": rows, "methods": states}))
    else:
        print(format_status(Path(args.run), rows, states))


def _dry_run(args) -> None:
    from ulbench.run.plan import estimate_times, format_plan, make_plan, resolve_device
    from ulbench.run.plan_gpu import format_gpu_plan, gpu_options
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
    from ulbench.report.check import compare, format_comparison

    passed, entries = compare(args.run, args.baseline)
    print(format_comparison(entries))
    print("check passed" if passed else f"check FAILED against {args.baseline}")
    return 0 if passed else 1


def cmd_baseline(args) -> None:
    from ulbench.report.check import SPREAD_FACTOR, write_baseline

    factor = SPREAD_FACTOR if args.factor is None else args.factor
    b = write_baseline(args.run, args.output, spread=args.spread, factor=factor)
    how = f"tolerances {factor:g} x the spread of {len(args.spread)} other seeds" if args.spread else \
        "default tolerances"
    print(f"wrote {args.output}: {len(b['metrics'])} metrics from {args.run} ({how})")


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
    p.add_argument("--dist-timeout", type=float, metavar="S",
                   help="under torchrun/SLURM: seconds a rank waits for a dead peer before all exit (default 1800)")
    p.add_argument("--launcher", default="local", help="local (this process, or torchrun's group; default) or "
                   "slurm (one job per method through submitit)")
    g = p.add_argument_group("SLURM (--launcher slurm)")
    g.add_argument("--partition")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0)
    g.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU, 1 without GPUs)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--time", type=int, default=24 * 60, metavar="MIN", help="job time limit in minutes; a job "
                   "that reaches it is requeued and resumes (default 1440)")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--wait", action="store_true", help="block until every job ends; exit 1 if one failed")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="per method and point of a run: done / running / queued / failed",
                       description="State of a run directory's methods and points, with each job's last log line.",
                       epilog="examples:\n  ulbench status runs/imagenet512/main", formatter_class=fmt)
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
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
    p.add_argument("--spread", nargs="+", default=[], metavar="RUN",
                   help="runs of the same suite under other seeds: each metric's tolerance is --factor x its largest "
                        "deviation from RUN among them")
    p.add_argument("--factor", type=float, default=None,
                   help="multiple of the measured spread (default: ulbench.report.check.SPREAD_FACTOR, 3)")
    p.set_defaults(func=cmd_baseline)
    p = lsub.add_parser("suites", help="suite files in a folder", description="List suite files with descriptions.",
                        epilog="examples:\n  ulbench ls suites\n  ulbench ls suites --dir my_suites/",
                        formatter_class=fmt)
    p.add_argument("--dir", default="suites")
    p.set_defaults(func=cmd_ls_suites)
    p = lsub.add_parser("metrics", help="metrics a suite can ask for", description="List metrics.",
                        epilog="examples:\n  ulbench ls metrics", formatter_class=fmt)
    p.set_defaults(func=cmd_ls_metrics)
