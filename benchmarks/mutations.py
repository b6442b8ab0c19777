"""Does `ulbench check` catch real bugs? Apply six named bugs one at a time to a copy of the repository, rerun the
smoke suite there and check it against the committed baseline (benchmarks/RESULTS.md, "Mutation campaign").

    python benchmarks/mutations.py                      # every mutation, plus an unmodified control run
    python benchmarks/mutations.py --only ema-frozen    # some of them
    python benchmarks/mutations.py --list               # what each one changes, without running anything

Each mutation is a one-line source change, found by its exact text (the script stops if the text is gone, so a
refactor cannot turn a mutation into a silent no-op). Every run happens in its own copy of the tracked files under
``--work`` with that copy first on PYTHONPATH, so the checkout in use is never modified. The table (mutation, caught,
the metrics that moved past their tolerance, wall time) is printed and written to ``--out`` as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    # the suite's methods rerun (None: all). UL only for the changes in ul_model's model and sampler, which the
    # SD-latent baselines do not run (they use nothing of ul_model but SampleNoise and the training loop); also for
    # the rolled labels (the smoke's DiT does not learn its conditioning yet: class_acc at chance) and the frozen
    # EMA (one class for every method), to halve the campaign.
    methods: tuple[str, ...] | None = None


UL_ONLY = ("ul",)


MUTATIONS = (
    Mutation("sampler-sign-flip", "the samplers read the network's v prediction with the wrong sign",
             "ul_model/sampling.py", "    return x_from_v(z, v, alpha, sigma), eps_from_v(z, v, alpha, sigma)",
             "    return x_from_v(z, -v, alpha, sigma), eps_from_v(z, -v, alpha, sigma)", UL_ONLY),
    Mutation("decoder-endpoint", "the decoder's schedule ends at the prior's log-SNR (5) instead of its own (15)",
             "ul_model/model.py",
             "LogSNRSchedule(d.decoder_lambda_min, d.decoder_lambda_max, shift, shift_end)",
             "LogSNRSchedule(d.decoder_lambda_min, d.lambda_z0, shift, shift_end)", UL_ONLY),
    Mutation("labels-shuffled", "stage 2 trains each latent under another image's label (labels rolled by one)",
             "ulbench/methods/base.py", "    return LatentDataset(cache, ds.labels, xflip=data.xflip)",
             "    import numpy as np\n    return LatentDataset(cache, np.roll(ds.labels, 1), xflip=data.xflip)",
             UL_ONLY),
    Mutation("encoder-detached", "the encoder's output is detached: no gradient reaches the encoder",
             "ul_model/model.py", "        z_clean = self.encoder(x)\n        return z_clean, losses.encode_z0(",
             "        z_clean = self.encoder(x).detach()\n        return z_clean, losses.encode_z0(", UL_ONLY),
    Mutation("ema-frozen", "the exponential EMA is never updated (evaluation sees the initial weights)",
             "ul_model/ema.py", "    def update(self, model: nn.Module, nimg: float = 0, batch_size: int = 0) -> None:\n"
             "        _blend(self.shadow, model, self.decay)",
             "    def update(self, model: nn.Module, nimg: float = 0, batch_size: int = 0) -> None:\n"
             "        pass", UL_ONLY),
    Mutation("schedule-off-by-one", "the sampler's step loop stops one step early (the last step to t = 0 skipped)",
             "ul_model/sampling.py", "    for t, s in zip(ts[:-1], ts[1:]):", "    for t, s in zip(ts[:-2], ts[1:-1]):",
             UL_ONLY),
)


def copy_tree(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of this checkout (its working state), copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    if dest.exists():
        shutil.rmtree(dest)
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(mutation: Mutation, root: Path) -> None:
    path = root / mutation.file
    text = path.read_text()
    if text.count(mutation.old) != 1:
        raise SystemExit(f"mutation {mutation.name}: the text to change occurs {text.count(mutation.old)} times in "
                         f"{mutation.file} (expected once); update benchmarks/mutations.py")
    path.write_text(text.replace(mutation.old, mutation.new))


def run_one(name: str, mutation: Mutation | None, suite: str, baseline: str, work: Path, reuse: bool = False) -> dict:
    root = work / name
    run_dir = root / "runs" / Path(suite).stem / name
    if reuse and (run_dir / "results.jsonl").is_file():  # a finished run of this mutation: check it again
        return check_one(name, mutation, root, run_dir, baseline, wall=float("nan"))
    copy_tree(root)
    if mutation is not None:
        apply(mutation, root)
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    methods = None if mutation is None else mutation.methods
    # `ulbench run SUITE`, restricted to ``methods`` (the launchers' own entry points: create_run, resume_run)
    script = ("import sys; from pathlib import Path; from ulbench.run.directory import create_run, resume_run; "
              "resume_run(create_run(sys.argv[1], [], Path('runs'), sys.argv[2]), progress=False, "
              "methods=None if sys.argv[3] == '-' else sys.argv[3].split(','))")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", script, suite, name, ",".join(methods) if methods else "-"],
                         cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode != 0:  # a crash is caught too: the suite did not produce results
        return _row(name, mutation, wall) | {
            "caught": True, "how": f"the run failed (exit {run.returncode}): "
                                   f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ''}"}
    return check_one(name, mutation, root, run_dir, baseline, wall)


def _row(name: str, mutation: Mutation | None, wall: float) -> dict:
    methods = None if mutation is None else mutation.methods
    return {"mutation": name, "what": mutation.what if mutation else "unmodified code (control)",
            "file": mutation.file if mutation else "", "methods": list(methods) if methods else "all",
            "wall_s": round(wall, 1)}


def check_one(name: str, mutation: Mutation | None, root: Path, run_dir: Path, baseline: str, wall: float) -> dict:
    from ulbench.report.check import compare  # this checkout's (no mutation touches the check)

    methods = None if mutation is None else mutation.methods
    row = _row(name, mutation, wall)
    passed, entries = compare(run_dir, REPO / baseline)
    if methods:  # only the rerun methods' entries (the others are absent by design, not MISSING)
        entries = [e for e in entries if e["method"] in methods]
        passed = all(e["status"] in ("ok", "improved") for e in entries)
    flagged = [f"{e['method']}/{e['point']}/{e['metric']} {e['status']}" for e in entries
               if e["status"] not in ("ok", "improved")]
    return row | {"caught": not passed, "how": "; ".join(flagged), "entries": entries}


def markdown(rows: list[dict]) -> str:
    lines = ["| mutation | what | methods rerun | caught | flagged (method/point/metric status) | wall |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        methods = r["methods"] if isinstance(r["methods"], str) else ", ".join(r["methods"])
        lines.append(f"| {r['mutation']} | {r['what']} | {methods} | {'yes' if r['caught'] else 'no'} | "
                     f"{r['how'] or '-'} | {r['wall_s'] / 60:.1f} min |".replace("nan min", "(reused)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="suites/smoke.yaml")
    p.add_argument("--baseline", default="reports/baselines/smoke.json")
    p.add_argument("--only", nargs="*", default=None, help="mutation names (default: all, and the control run)")
    p.add_argument("--no-control", action="store_true", help="skip the unmodified run")
    p.add_argument("--work", default="/tmp/ulbench-mutations", help="where the copies and their runs go")
    p.add_argument("--out", default="benchmarks/mutations.json", help="the table as JSON")
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    p.add_argument("--reuse", action="store_true", help="re-check finished runs under --work instead of rerunning")
    args = p.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:22s} {m.file:24s} {m.what}")
        return 0
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutation(s) {sorted(unknown)}; --list shows them")
    work = Path(args.work)
    rows = [] if args.no_control else [run_one("control", None, args.suite, args.baseline, work, args.reuse)]
    for m in chosen:
        rows.append(run_one(m.name, m, args.suite, args.baseline, work, args.reuse))
        print(f"{m.name}: caught={rows[-1]['caught']} {rows[-1]['how']}", flush=True)
    out = REPO / args.out
    out.write_text(json.dumps({"suite": args.suite, "baseline": args.baseline, "rows": rows}, indent=1) + "\n")
    print(markdown(rows))
    caught = sum(r["caught"] for r in rows if r["mutation"] != "control")
    control = next((r for r in rows if r["mutation"] == "control"), None)
    print(f"caught {caught} of {len(chosen)}; control run "
          f"{'not run' if control is None else 'FAILED the check' if control['caught'] else 'passed'}")
    return 0 if control is None or not control["caught"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
