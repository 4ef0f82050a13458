"""A run's files (metrics.csv, curves.png) and the comparison of runs, a row/line/point per configuration.

    python evaluate.py runs/depth-*/best.pt --out results/depth    # evaluates, then compares here
    python studies/report.py --compare results/depth_vs_lr          # again, from the runs' files alone

A run: {label "<run dir>/<checkpoint>", report (eval.json), config (config.json), history (metrics.csv)}.
"""
import csv
import json
import math
import re
import statistics
import sys
from pathlib import Path

from runtime import one_line, replacing, write_text

# Args (config.json keys) on how or where a run ran: runs equal in all else but the seed make one group.
RUNTIME_KEYS = ("seed", "out", "resume", "device", "workers", "data_dir", "compile", "compile_mode",
                "tensorboard", "channels_last", "deterministic", "world_size", "torch")
# config.json's keys computed from the others (mean/std of a seeded training subset vary by seed).
DERIVED_KEYS = ("mean", "std", "train_samples", "val_samples", "test_samples", "amp_dtype")
STATS = ("top1", "top5", "loss", "train_seconds")  # mean +- std per group
COLUMNS = ("run", "n", "seeds", "model", "dataset", "params", "macs", "top1", "top1_std", "top5",
           "top5_std", "loss", "loss_std", "latency_ms_batch1", "images_per_second", "epochs",
           "train_seconds", "train_seconds_std", "checkpoint")
RUN_COLUMNS = ("run", "group", "seed", *(c for c in COLUMNS[3:] if not c.endswith("_std")))  # a row per run
# eval.json's fields read here and by studies/report.py: numbers (null allowed but for top1), texts
NUMBERS = STATS + ("params", "macs", "latency_ms_batch1", "images_per_second")
TEXTS = ("checkpoint", "device")
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_top1",
                  "test_top5", "epoch_seconds", "images_per_second", "ema_test_top1"]


def human(n):
    """12345678 -> '12.35M'; None -> '-'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n is not None and abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return "-" if n is None else str(n)


def save_figure(fig, path, **kw):
    """fig.savefig through the atomic writer (the temp file keeps the suffix: the format)."""
    with replacing(path) as tmp:
        fig.savefig(tmp, **kw)


def write_csv(path, header, rows):
    """A CSV file (None cells empty), written atomically."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def read_object(path):
    """A JSON file holding an object (dict), or ValueError '<path>: <what>'."""
    try:
        v = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {one_line(e, 200)}") from None
    if not isinstance(v, dict):
        raise ValueError(f"{path}: a JSON {type(v).__name__}, expected an object")
    return v


def read_report(path):
    """An eval.json whose fields read here and in studies/report.py are well typed, else ValueError."""
    report = read_object(path)
    for k in NUMBERS + TEXTS:
        v = report.get(k)
        real = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # JSON numbers
        ok, expected = ((v is None or isinstance(v, str), "a string") if k in TEXTS
                        else (real and 0 <= v <= 1 or k == "top5" and v is None, "a fraction in [0, 1]")
                        if k.startswith("top") else (real or v is None, "a finite number"))
        if not ok:
            raise ValueError(f"{path}: {k} is {one_line(repr(v), 60)}, expected {expected}")
    return report


def read_history(run_dir, fallback=None):
    """metrics.csv's rows (epoch an int, other numbers float, empty cells None), else `fallback`."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return list(fallback or [])
    rows = list(csv.DictReader(path.read_text().splitlines()))
    try:
        return [{k: None if v in ("", None) else int(float(v)) if k == "epoch" else float(v)
                 for k, v in row.items()} for row in rows]
    except (TypeError, ValueError, OverflowError) as e:  # not a number; a list: more cells than columns
        raise ValueError(f"{path}: " + ("a row with more cells than columns" if isinstance(e, TypeError)
                                        else one_line(e, 100))) from None


def write_metrics(history, path):
    """A run's metrics.csv (train.py writes it every epoch; read_history reads it)."""
    write_csv(path, METRIC_COLUMNS, [[row.get(k) for k in METRIC_COLUMNS] for row in history])


def plot_curves(history, path, title=""):
    """One run's curves.png: loss and accuracy per epoch (integer epoch ticks)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from matplotlib.ticker import MaxNLocator
    fig, ep = Figure(figsize=(11, 4.3)), [r["epoch"] for r in history]
    for ax, keys, scale, what in zip(fig.subplots(1, 2), (("train_loss", "val_loss", "test_loss"),
                                                          ("train_acc", "val_acc", "test_top1")),
                                     (1, 100), ("loss", "accuracy (%)")):
        for key in keys:
            if any(r.get(key) is not None for r in history):
                ax.plot(ep, [scale * r[key] if r.get(key) is not None else None for r in history], marker=".",
                        label=key.split("_")[0] + (" top-1" if key == "test_top1" else ""))
        ax.set(xlabel="epoch", ylabel=what, title=what.split(" ")[0])
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def load_run_dirs(dirs):
    """Runs from their folders' eval.json, config.json and metrics.csv (a malformed folder: a warning)."""
    runs = []
    for d in map(Path, dirs):
        try:
            report = read_report(d / "eval.json")
            runs.append({"label": f"{d.name}/{Path(report.get('checkpoint') or 'best.pt').name}",
                         "report": report, "history": read_history(d),
                         "config": read_object(d / "config.json") if (d / "config.json").is_file() else {}})
        except ValueError as e:
            print(f"warning: {e}; run left out", file=sys.stderr)
    return runs


def config_key(config):
    """The configuration without RUNTIME_KEYS and DERIVED_KEYS, as a comparable string."""
    return json.dumps({k: v for k, v in config.items() if k not in RUNTIME_KEYS + DERIVED_KEYS},
                      sort_keys=True, default=str)


def group_runs(runs):
    """Runs -> groups (lists), first seen first: one config_key and pairwise different seeds. A run without
    recorded args, or whose seed repeats in its bucket (best.pt and last.pt of a run), stays alone."""
    buckets = {}
    for i, r in enumerate(runs):
        buckets.setdefault(config_key(r["config"]) if r["config"] else i, []).append(r)
    groups = []
    for members in buckets.values():
        seeds = [repr(m["config"].get("seed")) for m in members]  # repr: any JSON value
        groups += [members] if "None" not in seeds and len({*seeds}) == len(seeds) else [[m] for m in members]
    return sorted(groups, key=lambda g: next(i for i, r in enumerate(runs) if r is g[0]))


def mean_std(values):
    """(mean, sample std (ddof=1) or None below 2) of the values not None; exact sums: any order, one mean."""
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None, statistics.stdev(values) if len(values) > 1 else None


def group_label(labels, seeds):
    """'mnist-vgg16-lr0.1-seed{0,1,2}/best.pt' when the run dirs are NAME-seed<S>, else 'a + b'."""
    parts = [re.fullmatch(r"(.+)-seed\d+(/[^/]*)", label) for label in labels]
    if len(parts) > 1 and all(parts) and len({(p[1], p[2]) for p in parts}) == 1:
        return f"{parts[0][1]}-seed{{{','.join(map(str, seeds))}}}{parts[0][2]}"
    return " + ".join(labels)


def summarize_groups(runs):
    """group_runs as dicts: label, short (no /best.pt), legend, runs, n, seeds, stats {key: (mean, std)}."""
    out = []
    for i, members in enumerate(group_runs(runs)):
        seeds = [m["config"].get("seed") for m in members]
        label = group_label([m["label"] for m in members], seeds)
        short = label.removesuffix("/best.pt")
        out.append({"label": label, "short": short, "legend": f"{i + 1}  {short}" + (
            f" (n={len(members)})" if len(members) > 1 else ""), "runs": members, "n": len(members),
            "seeds": seeds, "stats": {k: mean_std([m["report"].get(k) for m in members]) for k in NUMBERS}})
    return out


def group_curve(runs, key):
    """(epochs, means, stds or None, mean cumulative epoch_seconds or None) where every run has `key`."""
    per_run = []
    for r in runs:
        rows, total = {}, 0.0
        for h in sorted(r["history"], key=lambda h: h.get("epoch") or 0):
            total = None if total is None or h.get("epoch_seconds") is None else total + h["epoch_seconds"]
            if h.get("epoch") is not None and h.get(key) is not None:
                rows[int(h["epoch"])] = (h[key], total)
        per_run.append(rows)
    epochs = sorted(set.intersection(*(set(rows) for rows in per_run))) if per_run else []
    stats = [mean_std([rows[e][0] for rows in per_run]) for e in epochs]
    secs = [None if None in t else sum(t) / len(t) for t in ([r[e][1] for r in per_run] for e in epochs)]
    return (epochs, [m for m, _ in stats], [s for _, s in stats] if len(runs) > 1 else None,
            secs if epochs and None not in secs else None)


def _style(i, n):
    """Colour and line style of group i of n: tab10 / tab20 colours, dashes past 20 groups."""
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return cmap(i % cmap.N), ("-", "--", ":", "-.")[(i // cmap.N) % 4]


def _finish(axes, n, title, path):
    """One legend (n groups) for all panels, right of them (outside the axes); saved when a path is given."""
    fig = axes[0].figure
    fig.tight_layout()
    if handles := list(axes[0].get_lines()):
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.98), frameon=False, title=title,
                   title_fontsize=8, fontsize=8 if n <= 12 else 7, ncols=1 if n <= 24 else 2)
    if path is not None:
        save_figure(fig, path, bbox_inches="tight")
    return fig


def plot_runs_curves(groups, path=None):
    """Test top-1, training loss vs epoch and training time: a mean line and ± std band per group."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    axes = Figure(figsize=(12, 8), dpi=100).subplots(2, 2)
    curves = [{key: group_curve(g["runs"], key) for key in ("test_top1", "train_loss")} for g in groups]
    longest = max([c[k][3][-1] for c in curves for k in c if c[k][3]], default=0)
    unit, scale = (("s", 1) if longest < 120 else ("min", 60) if longest < 7200 else ("h", 3600))
    for i, (g, c) in enumerate(zip(groups, curves)):
        color, dash = _style(i, len(groups))
        for col, (key, factor) in enumerate((("test_top1", 100), ("train_loss", 1))):
            epochs, mean, std, secs = c[key]
            for ax, x in zip(axes[:, col], (epochs, secs and [s / scale for s in secs])):
                if x:
                    ax.plot(x, [m * factor for m in mean], color=color, linestyle=dash,
                            marker="." if len(x) <= 30 else None, label=g["legend"])
                if x and std:
                    lo, hi = ([(m + sign * s) * factor for m, s in zip(mean, std)] for sign in (-1, 1))
                    ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
    for row, xlabel in enumerate(("epoch", f"training time ({unit}, cumulative epoch_seconds)")):
        for ax, ylabel in zip(axes[row], ("test top-1 (%)", "training loss")):
            ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel.split(' (')[0]} vs {xlabel.split(' (')[0]}")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 1.25
    return _finish(axes.flat, len(groups), "run (n: seeds; line: mean, band: ± std)", path)


def plot_tradeoff(groups, path=None):
    """Final test top-1 against parameters, MACs and latency: a labelled point per group (mean, ± std bar
    where n > 1); log x past a 20x span; a panel without values (--no-timing) says so. Returns the Figure."""
    from matplotlib.figure import Figure
    axes = Figure(figsize=(15, 4.8), dpi=100).subplots(1, 3, sharey=True)
    for ax, (key, xlabel) in zip(axes, (("params", "parameters"), ("macs", "MACs per image"),
                                        ("latency_ms_batch1", "latency at batch 1 (ms)"))):
        points = [(i, g, g["stats"][key][0], *g["stats"]["top1"]) for i, g in enumerate(groups)
                  if None not in (g["stats"][key][0], g["stats"]["top1"][0])]
        xs = sorted(p[2] for p in points)
        for i, g, x, y, s in points:
            color, _ = _style(i, len(groups))
            ax.plot([x], [100 * y], marker="o", linestyle="none", color=color, label=g["legend"])
            if s:
                ax.vlines(x, 100 * (y - s), 100 * (y + s), color=color, linewidth=1.5)
            right = len(xs) > 1 and xs.index(x) >= len(xs) / 2  # label left of the point in the right half
            ax.annotate(g["short"] if len(groups) <= 8 else str(i + 1), (x, 100 * y), (-4 if right else 4, 4),
                        textcoords="offset points", fontsize=7, ha="right" if right else "left")
        if not points:
            ax.text(0.5, 0.5, "latency not measured\n(evaluate.py --no-timing)" if key.startswith("latency")
                    else "no values", transform=ax.transAxes, ha="center", va="center", color="0.4")
        else:
            ax.set(xscale="log" if xs[0] > 0 and xs[-1] > 20 * xs[0] else "linear", xmargin=0.1)
            if len(points) < len(groups):
                ax.text(0.02, 0.02, f"{len(groups) - len(points)} run(s) without a value", fontsize=7,
                        transform=ax.transAxes)
        ax.set(xlabel=xlabel, title=f"top-1 vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test top-1 (%)")
    return _finish(axes, len(groups), "run (n: seeds; point: mean, bar: ± std)", path)


def comparison(runs, out_dir):
    """comparison.csv/.md (a row per configuration), comparison_runs.csv/.md (per run), curves.png and
    tradeoff.png (comparison_*.png in a run's own folder: curves.png is train.py's); a group's unequal cells
    ';'-joined. Returns (comparison.md's text, the figures' names)."""
    groups, out_dir = summarize_groups(runs), Path(out_dir)
    same = lambda vs: vs[0] if len(set(map(str, vs))) == 1 else ";".join(map(str, vs))  # noqa: E731
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, run_rows = [], []
    for g in groups:
        reports = [m["report"] for m in g["runs"]]
        run_rows += [{**r, "run": m["label"], "group": g["label"], "seed": m["config"].get("seed"),
                      "epochs": r.get("epoch")} for m, r in zip(g["runs"], reports)]
        seeds = " ".join(str(s) for s in g["seeds"] if s is not None)
        rows.append({"run": g["label"], "n": g["n"], "seeds": seeds,
                     **{k: same([r.get(k) for r in reports]) for k in ("model", "dataset")},
                     "epochs": same([r.get("epoch") for r in reports]),
                     "checkpoint": ";".join(str(r.get("checkpoint")) for r in reports),
                     **{k: m for k, (m, _) in g["stats"].items()},
                     **{k + "_std": s for k, (_, s) in g["stats"].items() if k in STATS}})
    def md(r, n):  # a table row; cells 'mean ± std unit' in a group of 2+, 'value unit' otherwise
        def cell(key, f=str, unit=""):
            v, s = r.get(key), r.get(key + "_std")
            return "-" if v is None else f(v) + unit if s is None else f"{f(v)} ± {f(s)}{unit}"
        pct = lambda v: f"{v:.2%}"[:-1]  # noqa: E731
        return "| " + " | ".join([
            r["run"], str(r["model"]), str(r["dataset"]), str(n), human(r["params"]), human(r["macs"]),
            cell("top1", pct, "%"), cell("top5", pct, "%"), cell("loss", "{:.4f}".format),
            cell("latency_ms_batch1", "{:.2f}".format), cell("images_per_second", "{:,.0f}".format),
            cell("epochs"), cell("train_seconds", lambda v: f"{v / 60:.1f}", " min")]) + " |\n"
    head = ("| run | model | dataset | {} | params | MACs | top-1 | top-5 | loss | latency b1 (ms) | img/s | "
            "epochs | train time |\n|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
    note = (f"\nn > 1: the runs differ only in --seed (also ignored: {', '.join(RUNTIME_KEYS[1:])}; and "
            f"config.json's {', '.join(DERIVED_KEYS)}); cells are mean ± std over them, std the sample "
            "standard deviation (ddof=1); latency and img/s are means. Per-run rows: comparison_runs.md / "
            ".csv.\n") if any(g["n"] > 1 for g in groups) else ""
    text = {}
    for name, columns, table, n in (("comparison", COLUMNS, rows, "n"),
                                    ("comparison_runs", RUN_COLUMNS, run_rows, "seed")):
        write_csv(out_dir / f"{name}.csv", columns, [[r.get(c) for c in columns] for r in table])
        text[name] = head.format(n) + "".join(md(r, r[n]) for r in table) + (note if table is rows else "")
        write_text(out_dir / f"{name}.md", text[name])
    own = (out_dir / "metrics.csv").exists() or out_dir.resolve() in {
        Path(m["report"]["checkpoint"]).resolve().parent for m in runs if m["report"].get("checkpoint")}
    figures = [f"comparison_{n}" if own else n for n in ("curves.png", "tradeoff.png")]
    plot_runs_curves(groups, out_dir / figures[0])
    plot_tradeoff(groups, out_dir / figures[1])
    return text["comparison"], figures
