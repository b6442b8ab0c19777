"""The report (package docstring: what it reads and writes): rows of a run -> tables, matplotlib plots, sample grids,
``results.csv``, ``summary.md`` and a self-contained ``index.html``; published points as labelled markers.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ul_model.io import atomic_bytes
from ulbench.errors import UserError
from ulbench.io import atomic_write, fingerprint_id, read_json, read_json_lines
from ulbench.published import load_published

REQUIRED = ("method", "point", "metric", "metric_base", "value", "train_flops")
Y_LABELS = {"fid": "FID", "fd_dinov2": "FD-DINOv2", "kid": "KID", "fvd": "FVD", "pred_psnr": "PSNR of the predicted frames (dB)"}
LOG_Y = ("fid", "fd_dinov2", "kid", "fvd")
DISTANCE_LABELS = {"rfid": "rFID", "rfvd": "rFVD"}
CONTROL_NOTES = {"last-frame": "the last given frame repeated: what a model must beat",
                 "other-clips": "real clips of other videos: the floor at this N"}
STRIP_NOTE = ("Sample strips: each pair of rows is a real clip, then the model's clip of it; frames framed green were "
              "given (context), frames framed red were predicted. Stage-1 strips show reconstructions (nothing given).")
X_LABELS = {"stage2": "stage-2 training FLOPs (autoencoder excluded)",
            "total": "total training FLOPs (stage 1 autoencoder + stage 2)"}
PUBLISHED_NOTE = ("published, not measured: FID-50K vs ADM reference statistics, a different protocol fingerprint "
                  "from this run's small-N FIDs; published compute excludes the autoencoder")
RECIPES_NOTE = ("How each method was trained and sampled in this run; where it differs from what its authors published "
                "(DiT, EDM2), the published setting follows in parentheses.")



def load_run(run_dir: str | Path) -> tuple[dict, pd.DataFrame]:
    """``config.json`` and the rows of ``results.jsonl`` (train_flops / steps flattened to ``train_flops_stage2``...)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory (make one with `ulbench run SUITE`)")
    cfg_path, res_path = run_dir / "config.json", run_dir / "results.jsonl"
    config = read_json(cfg_path, f"missing; {run_dir} is not a run directory made by `ulbench run`")
    if not res_path.is_file():
        raise UserError(f"{res_path}: missing; the run has no results yet (resume it: `ulbench run --resume {run_dir}`)")
    rows = read_json_lines(res_path)
    for i, row in enumerate(rows, 1):
        missing = [k for k in REQUIRED if not isinstance(row, dict) or k not in row]
        if missing:
            raise UserError(f"{res_path}: row {i}: missing field(s) {', '.join(missing)}")
    if not rows:
        raise UserError(f"{res_path}: no results yet")
    df = pd.DataFrame(rows)
    for col in ("train_flops", "steps"):
        flat = pd.json_normalize([r.get(col) or {} for r in rows]).add_prefix(f"{col}_")
        df = pd.concat([df.drop(columns=[col], errors="ignore"), flat.set_index(df.index)], axis=1)
    for col in ("guidance", "ci95", "std", "grid", "fingerprint", "per_frame", "official_checkpoint"):
        if col not in df:
            df[col] = None
    return config, df


def _fmt_sci(x) -> str:
    return "" if x is None or pd.isna(x) else f"{x:.2e}"


def format_value(value: float, ci95=None, std=None) -> str:
    """``12.34 [11.9, 12.8]`` with a 95% CI, ``12.34 ± 0.5`` with a std, else ``12.34`` (4 significant digits)."""
    if isinstance(ci95, (list, tuple)) and len(ci95) == 2:
        return f"{value:.4g} [{ci95[0]:.4g}, {ci95[1]:.4g}]"
    if std is not None and not pd.isna(std):
        return f"{value:.4g} ± {std:.2g}"
    return f"{value:.4g}"


def _column(row) -> str:
    g = row["guidance"]
    return row["metric"] if g is None or pd.isna(g) else f"{row['metric']} (g={g:g})"


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method x point: train FLOPs per stage and one column per metric (and guidance)."""
    d = df.assign(column=df.apply(_column, axis=1),
                  text=[format_value(v, c, s) for v, c, s in zip(df["value"], df["ci95"], df["std"])])
    keys = ["method", "point"]
    flops = d.groupby(keys, sort=False)[[c for c in ("train_flops_stage1", "train_flops_stage2", "train_flops_total")
                                         if c in d]].first().map(_fmt_sci)
    values = d.pivot_table(index=keys, columns="column", values="text", aggfunc="first", sort=False)
    table = flops.join(values[list(dict.fromkeys(d["column"]))]).fillna("").reset_index()
    return table.rename(columns=lambda c: c.replace("train_flops_", "train FLOPs ") if c.startswith("train_") else c)


def _lr_text(t: dict) -> str:
    parts = [f"{t['lr']:g}"]
    if t.get("warmup_steps", 0) > 0:
        parts.append(f"warm-up {t['warmup_steps']} steps")
    if t.get("lr_rampup_images", 0) > 0:
        parts.append(f"ramp-up {t['lr_rampup_images']:.3g} img")
    if t.get("lr_decay_batches", 0) > 0:
        parts.append(f"1/sqrt decay after {t['lr_decay_batches']:.3g} batches")
    return ", ".join(parts) if len(parts) > 1 else f"{parts[0]} constant"


def _ema_text(t: dict) -> str:
    stds = t.get("ema_stds") or []
    if stds:
        return f"power-function std {stds[0]:g}" + (f" (+ {', '.join(f'{s:g}' for s in stds[1:])} kept)"
                                                      if len(stds) > 1 else "")
    return f"exponential {t['ema_decay']:g}"


RECIPE_COLUMNS = {  # column -> (text of a TrainConfig dict, the fields it shows)
    "batch": (lambda t: str(t["batch_size"]), ("batch_size",)),
    "lr schedule": (_lr_text, ("lr", "warmup_steps", "lr_rampup_images", "lr_decay_batches")),
    "optimizer": (lambda t: f"Adam{'W' if t.get('weight_decay', 0) else ''} betas {tuple(t['betas'])}"
                  + (f", wd {t['weight_decay']:g}" if t.get("weight_decay", 0) else ""), ("betas", "weight_decay")),
    "grad clip": (lambda t: "none" if t["grad_clip"] <= 0 else f"{t['grad_clip']:g}", ("grad_clip",)),
    "EMA": (_ema_text, ("ema_decay", "ema_stds")),
}


def _sampler_text(s: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in s.items()) if s else "-"


def recipes_table(config: dict) -> pd.DataFrame:
    """Per method and stage, the recipe the run trained and sampled with (config.json), each setting beside the
    published one where the authors published it: ``used (published: x)`` marks a difference; ``-`` means the
    authors published nothing for that stage (the harness's defaults)."""
    rows = []
    for name, m in (config.get("methods") or {}).items():
        published = m.get("published") or {}
        stages = list(m.get("train") or {})
        for stage in stages:
            used, pub = m["train"][stage], (published.get("train") or {}).get(stage) or {}
            row = {"method": name, "stage": stage}
            for col, (text, keys) in RECIPE_COLUMNS.items():
                cell = text(used)
                if pub and any(k in pub for k in keys):
                    expected = text({**used, **pub})
                    cell = cell if expected == cell else f"{cell} (published: {expected})"
                row[col] = cell
            row["as published"] = "-" if not pub else (
                "yes" if all(json.dumps(used.get(k)) == json.dumps(v) for k, v in pub.items()) else "no")
            final = stage == stages[-1]
            sampler, pub_sampler = m.get("sampler") or {}, published.get("sampler") or {}
            cell = _sampler_text(sampler) if final else ""
            if final and pub_sampler and any(sampler.get(k) != v for k, v in pub_sampler.items()):
                cell += f" (published: {_sampler_text(pub_sampler)})"
            row["sampler"] = cell
            row["guidance"] = ", ".join(f"{g:g}" for g in m.get("guidance") or []) if final else ""
            rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame) -> str:
    # pandas' to_markdown needs `tabulate`, which is not a dependency of ulbench (and not installed here): write it.
    cells = [[str(c) for c in df.columns]] + [[str(v).replace("|", "\\|") for v in row] for row in df.to_numpy()]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join([lines[0], "|" + "---|" * len(df.columns), *lines[1:]])


def fingerprint_lines(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """One line per metric stating its protocol fingerprint, and a warning per metric whose rows disagree."""
    lines, warnings = [], []
    for metric, d in df.groupby("metric", sort=False):
        ids = d["fingerprint"].map(fingerprint_id)
        if ids.nunique() == 1:
            lines.append(f"{metric}: fingerprint {ids.iloc[0]}")
            continue
        where = "; ".join(f"{fid} <- " + ", ".join(f"{m}/{p}" for m, p in zip(g["method"], g["point"]))
                          for fid, g in d.assign(fid=ids).groupby("fid", sort=False))
        warnings.append(f"WARNING: rows of {metric} carry {ids.nunique()} different protocol fingerprints; "
                        f"do not compare them: {where}")
    return lines, warnings


def _png(fig: Figure) -> bytes:  # a bare Figure renders with Agg: no pyplot, no global backend
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _curve_label(method: str, g) -> str:
    return method if g is None or pd.isna(g) else f"{method}, guidance {g:g}"


def _draw_published(ax, pub: pd.DataFrame) -> list[str]:
    """Published points with compute as hollow markers (star: unguided, triangle: guided), one text label per model;
    compute-less ones (UL) as one dashed line per model at its best reported setting. Returns what was drawn."""
    drawn = []
    for k, (label, c) in enumerate(pub[pub["train_flops"].notna()].groupby("label", sort=False)):
        for _, p in c.iterrows():
            guided = (pd.notna(p["guidance"]) and p["guidance"] > 1) or "autoguidance" in str(p["note"])
            ax.scatter([p["train_flops"]], [p["value"]], marker="^" if guided else "*", s=70 if guided else 140,
                       facecolors="none", edgecolors="black")
            drawn.append(f"{label} (published, {p['note']})")
        top = c.loc[c["value"].idxmax()]
        approx = ", ~FLOPs" if c["approximate"].any() else ""
        ax.annotate(f"{label} (published{approx})", (top["train_flops"], top["value"]), textcoords="offset points",
                    xytext=(7, 7 * (k % 3) - 3), fontsize=6)
    best = pub[pub["train_flops"].isna()].sort_values("value").drop_duplicates("label")  # best setting per model
    for k, (_, p) in enumerate(best.iterrows()):
        text = f"{p['label']} {p['value']:g} (published, {p['note']}; no training FLOPs given)"
        ax.axhline(p["value"], linestyle="--", color="gray", linewidth=1)
        ax.annotate(text, (0.01, p["value"]), xycoords=("axes fraction", "data"), xytext=(0, -2 if k == 0 else 2),
                    textcoords="offset points", va="top" if k == 0 else "bottom", fontsize=6, color="dimgray")
        drawn.append(text)
    return drawn


def plot_compute(df: pd.DataFrame, base: str, counts: str, published: pd.DataFrame | None, suite: str):
    """Training FLOPs vs FID/KID, one curve per method x guidance with its CI band; published points beside them."""
    d = df[(df["metric_base"] == base) & (df["point"] != "stage1")].copy()
    d["x_train_flops"] = d.get(f"train_flops_{counts}")
    d = d[d["x_train_flops"].notna()].sort_values("x_train_flops")
    official = d["official_checkpoint"].map(lambda v: isinstance(v, dict))
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    plotted = [_draw_official(ax, d[official])] if official.any() else []
    names, positive = ", ".join(dict.fromkeys(d["metric"])), bool((d["value"] > 0).all())
    d = d[~official]
    for (method, g), c in d.groupby(["method", d["guidance"].fillna(-1.0)], sort=False):
        g = None if g == -1.0 else g
        line, = ax.plot(c["x_train_flops"], c["value"], marker="o", label=_curve_label(method, g))
        ci = c["ci95"].map(lambda v: v if isinstance(v, (list, tuple)) and len(v) == 2 else (float("nan"),) * 2)
        if c["ci95"].map(lambda v: isinstance(v, (list, tuple))).any():
            ax.fill_between(c["x_train_flops"], [v[0] for v in ci], [v[1] for v in ci], color=line.get_color(),
                            alpha=0.2, linewidth=0)
        plotted.append(c[["method", "guidance", "point", "metric", "x_train_flops", "value"]])
    pub = published[published["metric_base"] == base] if published is not None else published
    drawn = _draw_published(ax, pub) if pub is not None and len(pub) else []
    if drawn:
        ax.scatter([], [], marker="*", s=140, facecolors="none", edgecolors="black", label="published, unguided (not measured)")
        ax.scatter([], [], marker="^", s=70, facecolors="none", edgecolors="black",
                   label="published, guided (not measured)")
        fig.text(0.01, -0.02, PUBLISHED_NOTE, fontsize=6, ha="left", va="top", wrap=True)
    drawn += _draw_controls(ax, df, base)
    drawn += [f"{r.method}: official checkpoint" for r in plotted[0].itertuples()] if official.any() else []
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    budgets = sorted(d["x_train_flops"].unique())
    if 0 < len(budgets) <= 8:  # a short ladder may cross no decade: label the rungs themselves
        ax.set_xticks(budgets, [f"{x:.2g}" for x in budgets])
    if base in LOG_Y and positive:  # KID is unbiased and can be <= 0 at small N: linear then
        ax.set_yscale("log")
    ax.set_xlabel(X_LABELS[counts])
    ax.set_ylabel(Y_LABELS.get(base, base))
    ax.set_title(f"{suite}: training compute vs {Y_LABELS.get(base, base)} ({names}; shaded: 95% CI)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig), pd.concat(plotted, ignore_index=True) if plotted else pd.DataFrame(), drawn


def _draw_official(ax, d: pd.DataFrame) -> pd.DataFrame:
    """Released checkpoints evaluated by this run's protocol, at their published training FLOPs: filled diamonds,
    one legend entry "official checkpoint" per method and guidance (measured here, unlike the hollow published
    markers)."""
    for (method, g), c in d.groupby(["method", d["guidance"].fillna(-1.0)], sort=False):
        g = None if g == -1.0 else g
        ax.scatter(c["x_train_flops"], c["value"], marker="D", s=60, edgecolors="black", zorder=3,
                   label=f"{_curve_label(method, g)}: official checkpoint (measured here, at published training FLOPs)")
    return d.assign(official_checkpoint=True)[["method", "guidance", "point", "metric", "x_train_flops", "value",
                                               "official_checkpoint"]]


def _draw_controls(ax, df: pd.DataFrame, base: str) -> list[str]:
    """Frame-prediction controls (rows at point ``control``) as labelled horizontal lines."""
    drawn = []
    for k, (_, c) in enumerate(df[(df["point"] == "control") & (df["metric_base"] == base)].iterrows()):
        text = f"control {c['method']}: {c['value']:.4g} ({CONTROL_NOTES.get(c['method'], 'no training')})"
        ax.axhline(c["value"], linestyle=(0, (4, 2)), color=("tab:red", "tab:gray")[k % 2], linewidth=1.2,
                   label=text)
        drawn.append(text)
    return drawn


def plot_per_frame(df: pd.DataFrame, suite: str) -> bytes:
    """PSNR of each predicted frame (mean over clips): every method's rungs and the controls."""
    d = df[(df["metric_base"] == "pred_psnr") & df["per_frame"].map(lambda v: isinstance(v, list))]
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for _, r in d.iterrows():
        control = r["point"] == "control"
        frames = range(len(r["per_frame"]))
        label = f"control {r['method']}" if control else _curve_label(f"{r['method']} {r['point']}", r["guidance"])
        ax.plot(frames, r["per_frame"], linestyle="--" if control else "-", marker="" if control else "o",
                markersize=3, label=label)
    ax.set_xlabel("predicted frame (0 = the first frame after the given ones)")
    ax.set_ylabel("PSNR (dB, uint8, mean over clips)")
    ax.set_title(f"{suite}: PSNR of each predicted frame", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_rate_vs_quality(df: pd.DataFrame, published: pd.DataFrame | None, suite: str):
    """rFID and PSNR vs bits/pixel of each method's stage-1 autoencoder, with UL's published c_lf sweep."""
    s = df[df["point"] == "stage1"].pivot_table(index="method", columns="metric_base", values="value", sort=False)
    fig = Figure(figsize=(11, 4.5))
    drawn = []
    pub = pd.DataFrame()
    if published is not None:
        pub = published[published["metric_base"].isin(["bits_per_pixel", "rfid", "psnr"])]
        pub = pub.pivot_table(index="label", columns="metric_base", values="value", sort=False)
    distance = "rfvd" if "rfvd" in s.columns else "rfid"  # clip suites: rFVD
    for ax, y, name in zip(fig.subplots(1, 2), (distance, "psnr"), (DISTANCE_LABELS[distance], "PSNR (dB)")):
        if {"bits_per_pixel", y} <= set(s.columns):
            m = s[["bits_per_pixel", y]].dropna()
            ax.scatter(m["bits_per_pixel"], m[y], marker="o", label="measured (this run)")
            for method, r in m.iterrows():
                ax.annotate(method, (r["bits_per_pixel"], r[y]), textcoords="offset points", xytext=(5, 3), fontsize=7)
        if {"bits_per_pixel", y} <= set(pub.columns):
            p = pub[["bits_per_pixel", y]].dropna().sort_values("bits_per_pixel")
            ax.plot(p["bits_per_pixel"], p[y], marker="D", linestyle=":", color="black", markerfacecolor="none",
                    label="UL, ImageNet-512 (published, not measured)")
            for label, r in p.iterrows():
                ax.annotate(label, (r["bits_per_pixel"], r[y]), textcoords="offset points", xytext=(5, -9), fontsize=6)
            drawn += [f"{label} (published)" for label in p.index if f"{label} (published)" not in drawn]
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor-tick labels collide on short log ranges
        if y in ("rfid", "rfvd") and ax.has_data():
            ax.set_yscale("log")
        ax.set_xlabel("bits per pixel (latent rate)")
        ax.set_ylabel(name)
        ax.set_title(f"{suite}: {name} vs rate", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel with no rows (metric not asked for) has nothing to name
            ax.legend(fontsize=7)
    if drawn:
        fig.text(0.01, -0.02, "published: 50k ImageNet-512 reconstructions, a different fingerprint", fontsize=6)
    return _png(fig), drawn


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _inside(folder: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks and ``..`` resolved) lies inside ``folder``."""
    return path.resolve().is_relative_to(folder.resolve())


def _write_inside(out_dir: Path, rel: str, data: bytes) -> Path:
    """Write ``out_dir/rel``, refusing a destination that resolves outside ``out_dir`` (e.g. a ``grids`` symlink)."""
    dest = out_dir / rel
    if not _inside(out_dir, dest):
        raise UserError(f"{dest}: resolves to {dest.resolve()}, outside the report folder {out_dir}; remove the "
                        "link or choose another --out")
    atomic_bytes(dest, data)
    return dest


def copy_grids(run_dir: Path, df: pd.DataFrame, out_dir: Path) -> tuple[dict, list[str]]:
    """Copy each row's sample grid to ``grids/<method>_<point>.png`` (``_g<guidance>`` when a point has several).
    Only files inside the run directory are read: a ``grid`` naming an absolute path, ``../`` or a symlink that
    leads out of it is skipped with a warning naming the row (results.jsonl is data, not a list of files to embed)."""
    g = df[df["grid"].notna()].drop_duplicates(["method", "point", "grid"])
    several = g.groupby(["method", "point"])["grid"].transform("nunique") > 1
    written, warnings = {}, []
    for (i, r), multi in zip(g.iterrows(), several):
        src = run_dir / str(r["grid"])
        if not isinstance(r["grid"], str) or not _inside(run_dir, src):
            warnings.append(f"results.jsonl row {i + 1} ({r['method']}/{r['point']}): sample grid {r['grid']!r} lies "
                            f"outside the run directory {run_dir}; not embedded")
            continue
        if not src.is_file():
            warnings.append(f"missing sample grid {src} ({r['method']}/{r['point']})")
            continue
        suffix = f"_g{r['guidance']:g}" if multi and r["guidance"] is not None and not pd.isna(r["guidance"]) else ""
        rel = f"grids/{_safe(r['method'])}_{_safe(r['point'])}{suffix}.png"
        written[rel] = _write_inside(out_dir, rel, src.read_bytes())
    return written, warnings


def default_out_dir(suite: str, where: Path) -> Path:
    """``reports/<suite>``: the suite name comes from the run's config.json, so it must be a plain folder name that
    keeps the report inside ``reports/``."""
    reports = Path("reports")
    out = reports / suite
    if not suite or suite in (".", "..") or any(c in suite for c in "/\\\0") or not _inside(reports, out) \
            or out.resolve() == reports.resolve():
        raise UserError(f"{where}: suite name {suite!r} would place the report outside reports/ ({out.resolve()}); "
                        "fix the name or pass --out DIR")
    return out


def _html_page(config: dict, table: pd.DataFrame, fp_lines: list[str], warnings: list[str], pngs: dict,
               published: pd.DataFrame | None, figure_note: str = "", recipes: pd.DataFrame | None = None) -> str:
    e = html.escape
    info = "".join(f"<li><b>{k}</b>: {e(str(config.get(k)))}</li>" for k in ("suite", "git_commit", "created_at"))
    images = "".join(f"<h3>{e(name)}</h3><img alt='{e(name)}' src='data:image/png;base64,"
                     f"{base64.b64encode(data).decode('ascii')}'>" for name, data in pngs.items())
    pub = "" if published is None else ("<h2>Published reference points (not measured)</h2>" + published[
        ["label", "metric", "value", "note", "train_flops", "approximate", "formula", "source"]].to_html(index=False))
    warn = "".join(f"<p class='warn'>{e(w)}</p>" for w in warnings)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ulbench report: {e(config.get('suite', ''))}"
            "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}.warn{color:#b00;font-weight:bold}img{max-width:100%}"
            f"</style></head><body><h1>ulbench report: {e(config.get('suite', ''))}</h1><ul>{info}</ul>{warn}"
            f"<h2>Summary</h2>{table.to_html(index=False)}<h2>Protocol fingerprints</h2><ul>"
            + "".join(f"<li><code>{e(line)}</code></li>" for line in fp_lines)
            + "</ul>" + ("" if recipes is None or recipes.empty else
                         f"<h2>Recipes</h2><p>{e(RECIPES_NOTE)}</p>{recipes.to_html(index=False)}")
            + f"<h2>Figures and sample grids</h2><p>{e(figure_note)}</p>{images}{pub}</body></html>\n")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write the report; returns ``paths`` (name -> Path written), ``plotted`` (the compute-plot points: method,
    guidance, point, metric, x_train_flops, value), ``x_axis``, ``published_drawn`` (labels) and ``warnings``."""
    run_dir = Path(run_dir)
    config, df = load_run(run_dir)
    resolved = config.get("resolved") or {}
    suite = config.get("suite") or str(df["suite"].iloc[0] if "suite" in df else run_dir.parent.name)
    counts = (resolved.get("compute") or {}).get("counts", "stage2")
    if counts not in X_LABELS:
        raise UserError(f"{run_dir / 'config.json'}: compute.counts is '{counts}'; expected one of {list(X_LABELS)}")
    pub_name = (resolved.get("report") or {}).get("published")
    published = load_published(pub_name) if pub_name else None
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(str(suite), run_dir / "config.json")
    pngs, plotted, drawn = {}, [], []
    for base in ("fid", "fd_dinov2", "kid", "fvd", "pred_psnr"):
        if ((df["metric_base"] == base) & ~df["point"].isin(["stage1", "control"])).any():
            png, pts, labels = plot_compute(df, base, counts, published, suite)
            pngs[f"compute_vs_{base}.png"], drawn = png, drawn + labels
            plotted.append(pts)
    if "per_frame" in df and (df["metric_base"] == "pred_psnr").any():
        pngs["psnr_per_frame.png"] = plot_per_frame(df, suite)
    if (df["point"] == "stage1").any():
        pngs["rate_vs_quality.png"], labels = plot_rate_vs_quality(df, published, suite)
        drawn += labels
    paths = {}
    for name, data in pngs.items():
        paths[name] = _write_inside(out_dir, name, data)
    grids, warnings = copy_grids(run_dir, df, out_dir)
    paths.update(grids)
    pngs.update({rel: p.read_bytes() for rel, p in grids.items()})
    table = summary_table(df)
    fp_lines, fp_warnings = fingerprint_lines(df)
    warnings = fp_warnings + warnings
    flat = df.assign(**{c: df[c].map(lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v)
                        for c in ("ci95", "fingerprint", "versions", "per_frame", "official_checkpoint") if c in df})
    with atomic_write(out_dir / "results.csv") as f:
        flat.to_csv(f, index=False)
    head = (f"run `{run_dir}`, git commit `{config.get('git_commit')}`, created {config.get('created_at')}; "
            f"train FLOPs per stage (plots use {counts}).")
    recipes = recipes_table(config)
    md = [f"# ulbench report: {suite}", "", head, "",
          markdown_table(table), "", "## Protocol fingerprints", "", *[f"- {line}" for line in fp_lines],
          *[f"- **{w}**" for w in fp_warnings], ""]
    if not recipes.empty:
        md += ["## Recipes", "", RECIPES_NOTE, "", markdown_table(recipes), ""]
    if published is not None:
        md += [f"Published reference points ({pub_name}) are drawn on the plots: {PUBLISHED_NOTE}.", ""]
    with atomic_write(out_dir / "summary.md") as f:
        f.write("\n".join(md))
    with atomic_write(out_dir / "index.html") as f:
        f.write(_html_page(config, table, fp_lines, warnings, pngs, published,
                           STRIP_NOTE if (resolved.get("dataset") or {}).get("frames") else "", recipes))
    paths.update({n: out_dir / n for n in ("results.csv", "summary.md", "index.html")})
    return {"paths": paths, "plotted": pd.concat(plotted, ignore_index=True) if plotted else pd.DataFrame(),
            "x_axis": counts, "x_label": X_LABELS[counts], "published_drawn": drawn, "warnings": warnings}
