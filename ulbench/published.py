"""Published reference points (package data ``ulbench/published/<name>.yaml``) as a pandas DataFrame.

Every entry names its source. Training compute is computed here from the inputs the paper gives (forward
multiply-adds, batch, steps or images) with the formula the entry states, never typed in pre-computed; entries whose
paper gives no compute (UL) have ``train_flops`` None and are drawn as horizontal reference lines.
"""
from __future__ import annotations

import re
from importlib import resources

import pandas as pd
import yaml

from ulbench.errors import UserError

# FLOPs = 2 x multiply-adds (DiT's and EDM2's "Gflops" are multiply-adds); training ~ 3 x forward (forward + backward).
FORMULAS = {
    "2 x 3 x forward MACs x batch x steps": lambda e: 2 * 3 * e["forward_gmacs"] * 1e9 * e["batch"] * e["steps"],
    "2 x 3 x forward MACs x images": lambda e: 2 * 3 * e["forward_gmacs"] * 1e9 * e["train_mimg"] * 1e6,
}
REQUIRED = ("method", "label", "metric", "value", "source")
COLUMNS = ["method", "label", "model", "setting", "metric", "metric_base", "value", "guidance", "note", "train_flops",
           "approximate", "forward_gmacs", "batch", "steps", "train_mimg", "params_m", "formula", "source"]


def available() -> list[str]:
    folder = resources.files("ulbench") / "published"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def metric_base(metric: str) -> str:
    """``fid50k`` -> ``fid``, ``rfid50k`` -> ``rfid``; ``psnr`` and ``bits_per_pixel`` stay as they are."""
    m = re.fullmatch(r"(fid|rfid|kid|fvd)\d+k?", metric)
    return m.group(1) if m else metric


def _train_flops(entry: dict, where: str) -> float | None:
    formula = entry.get("formula")
    if formula is None:
        return None
    if formula not in FORMULAS:
        raise UserError(f"{where}: unknown formula '{formula}'; known: {', '.join(FORMULAS)}")
    try:
        return float(FORMULAS[formula](entry))
    except KeyError as e:
        raise UserError(f"{where}: formula '{formula}' needs the field {e.args[0]}") from None


def load_published(name: str) -> pd.DataFrame:
    """The reference points of ``ulbench/published/<name>.yaml``, one row per (model, setting, metric)."""
    names = available()
    if name not in names:
        raise UserError(f"no published reference set '{name}'; available: {', '.join(names) or '(none)'} "
                        f"(files in ulbench/published/)")
    path = resources.files("ulbench") / "published" / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text())
    rows = []
    for i, entry in enumerate(doc.get("entries") or []):
        where = f"{path}: entries[{i}]"
        missing = [k for k in REQUIRED if entry.get(k) in (None, "")]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)}")
        row = {k: entry.get(k) for k in COLUMNS}
        row["metric_base"] = metric_base(entry["metric"])
        row["approximate"] = bool(entry.get("approximate", False))
        row["train_flops"] = _train_flops(entry, where)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)
