"""`ulbench report RUN`: plots, tables and one self-contained HTML page from a (finished or partial) sweep run.

Reads ``RUN/config.json`` and ``RUN/results.jsonl`` (one row per method x point x metric x guidance), writes into
``reports/<suite>/`` (or ``--out``): ``compute_vs_fid.png`` (+ ``compute_vs_kid.png``), ``rate_vs_quality.png``,
``grids/<method>_<point>.png``, ``results.csv``, ``summary.md`` and ``index.html`` (every PNG embedded as base64).
Clip suites: ``compute_vs_fvd.png``, ``compute_vs_pred_psnr.png`` and ``psnr_per_frame.png`` with the two
frame-prediction controls drawn on each, rate vs rFVD / PSNR, and sample strips (given frames framed green).
Published reference points (``report.published``) are drawn as labelled markers, never mixed with measured ones.
"""
from __future__ import annotations

import argparse

# ``ulbench`` builds its parser from every subcommand's register(): this package's own import stays light, and the
# report's implementation (pandas, matplotlib: ~0.7 s) loads on first use, e.g. ``from ulbench.report import
# write_report``.
EXAMPLES = """examples:
  ulbench report runs/smoke/ci                      # into reports/smoke/
  ulbench report runs/imagenet512/main --out /tmp/r  # anywhere; index.html works when copied alone
  ulbench report runs/smoke/ci && xdg-open reports/smoke/index.html"""


def __getattr__(name: str):
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("ulbench.report.render"), name)


def cmd_report(args) -> None:
    from ulbench.report.render import write_report

    r = write_report(args.run, args.out)
    for w in r["warnings"]:
        print(w)
    grids = [p for name, p in r["paths"].items() if name.startswith("grids/")]
    for name, path in r["paths"].items():
        if not name.startswith("grids/"):
            print(f"wrote {path}")
    if grids:
        print(f"wrote {len(grids)} sample grids into {grids[0].parent}")
    print(f"open {r['paths']['index.html']}")


def register(sub) -> None:
    p = sub.add_parser("report", help="plots, tables and an HTML page from a run directory",
                       description="Write compute-vs-FID/KID and rate-vs-quality plots, sample grids, results.csv, "
                                   "summary.md and a self-contained index.html from a (partial) run.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (RUN/config.json, RUN/results.jsonl)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<suite>/ under the current directory)")
    p.set_defaults(func=cmd_report)
