"""Suite-loader fuzzing campaign: tests/test_fuzz_suites.py's two properties (mutated committed suites, random
``--set`` strings: every outcome a valid suite or a UserError naming file and key) with many random examples.

    python benchmarks/fuzz_suites.py --examples 5000 --seed 1    # writes benchmarks/fuzz_suites.json

CI runs the same tests derandomized with 200 examples each."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=5000, help="examples per property")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "fuzz_suites.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = Path(tmp) / "outcomes.json"
        env = {**os.environ, "ULBENCH_FUZZ_EXAMPLES": str(args.examples), "ULBENCH_FUZZ_SEED": str(args.seed),
               "ULBENCH_FUZZ_OUTCOMES": str(outcomes), "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                               "tests/test_fuzz_suites.py", "-k", "located"], cwd=REPO, env=env)
        wall = time.perf_counter() - t0
        counts = json.loads(outcomes.read_text()) if outcomes.exists() else {}
    result = {"examples_per_property": args.examples, "seed": args.seed, "passed": proc.returncode == 0,
              "wall_s": round(wall, 1), "outcomes": counts}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print("| property | valid suites | UserError (located) |\n|---|---|---|")
    for prop in sorted({k.split(": ")[0] for k in counts}):
        print(f"| {prop} | {counts.get(prop + ': valid', 0)} | {counts.get(prop + ': UserError', 0)} |")
    print(f"{'PASSED' if proc.returncode == 0 else 'FAILED'}: {args.examples} examples per property, seed "
          f"{args.seed}, {wall:.0f} s")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
