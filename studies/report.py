"""The README's study table, written from the files under results/: no number is typed by hand.

    python studies/report.py            # print the table block
    python studies/report.py --write    # README.md's marked blocks (study table, seed table) + the figure
    python studies/report.py --check    # exit 1 when README.md's block is not what results/ says
    python studies/report.py --compare results/depth_vs_lr   # its comparison.* and figures again

--compare rebuilds a study folder's comparison.* and figures with compare.py from its runs'
eval.json, config.json and metrics.csv (results/ keeps no checkpoints), in the order of its old
comparison.csv; a run whose files have the wrong shape is left out with a warning.

TABLE lists each row's published figures (from the papers) and, in the same order, the run behind
each: results/<study>/<run>/ or every results/<study>/<run>-seed<S>/. "ours" is the eval.json
top-1 (error rows: 100 - top-1) in %, over seeds mean ± std (compare.mean_std), "(n=K)" when K > 1;
runs in the study's diverged.txt count as diverged; "–": no run; "not yet run": none in the row.
The label gives the runs' budget: eval.json's hardware (a CPU's thread count: "1-thread CPU" under
OMP_NUM_THREADS=1) and config.json's epochs. Seeds pooled must be one configuration
(compare.group_runs) and every file read must have the right shape, or this stops with one line.
"""
import argparse
import csv
import re
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compare import (RUNTIME_KEYS, comparison, config_key, group_runs, load_run_dirs, mean_std,  # noqa: E402
                     read_history, read_object, read_report, save_figure)
from runtime import run_cli, write_text  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# (study, rows, published, results/<dir>, the run behind each published figure, metric)
LRS = ("0.1", "0.01", "0.001")
TABLE = [
    ("depth vs lr, MNIST (10 epochs)", "VGG-16 at lr 0.1 / 0.01 / 0.001", "9.8 / 99.5 / 99.5 % top-1",
     "depth_vs_lr", tuple(f"mnist-vgg16-lr{lr}" for lr in LRS), "top1"),
    ("", "ResNet-18", "99.2 / 99.4 / 99.3",
     "depth_vs_lr", tuple(f"mnist-resnet18-lr{lr}" for lr in LRS), "top1"),
    ("depth vs lr, CIFAR-10 (20 epochs)", "VGG-16", "10 / 87.1 / 89.2",
     "depth_vs_lr", tuple(f"cifar10-vgg16-lr{lr}" for lr in LRS), "top1"),
    ("", "ResNet-18", "88.7 / 90.0 / 90.1",
     "depth_vs_lr", tuple(f"cifar10-resnet18-lr{lr}" for lr in LRS), "top1"),
    ("residual inception, CIFAR-10", "GoogLeNet 3x3 / 5x5 / 3x3+identity / 5x5+identity",
     "14.56 / 14.33 / 13.73 / 13.39 % top-1 error", "residual_inception",
     ("googlenet-k3", "googlenet-k5", "googlenet-k3-identity", "googlenet-k5-identity"), "error"),
    ("", "3x3 with / without aux heads", "14.56 / 14.69",
     "residual_inception", ("googlenet-k3-aux", "googlenet-k3"), "error"),
    ("CIFAR ResNet depth (164 epochs)", "ResNet-20 / 32 / 44 / 56 / 110",
     "8.75 / 7.51 / 7.17 / 6.97 / 6.43 % test error", "cifar_resnet_depth",
     tuple(f"resnet{d}" for d in (20, 32, 44, 56, 110)), "error"),
    ("", "plain-20 / 32 / 44 / 56 (no shortcuts)", "figure 6 only (no table)",
     "cifar_resnet_depth", tuple(f"plain{d}" for d in (20, 32, 44, 56)), "error"),
    ("architectures, CIFAR-10", "AlexNet / VGG-19 / ResNet-18 / 34 / 50",
     "77.6 / 74.7 / 89.3 / 89.6 / 89.2 % top-1", "architectures",
     tuple(f"cifar10-{m}" for m in ("alexnet", "vgg19", "resnet18", "resnet34", "resnet50")), "top1"),
]
UNITS = {"top1": "% top-1", "error": "% test error"}
# The seed report's table 1 (CIFAR-10 test error %, 20 / 50 / 100 epochs) and its training times (s,
# ResNet-20 only, on its GPU); ours: results/<SEED_DIRS[epochs]>/resnet<depth>/.
SEED = {20: (19.33, 17.78, 10.04), 32: (19.85, 14.00, 9.36), 44: (18.56, 16.26, 9.66)}
SEED_SECONDS = {20: (838, 2074, 4113)}
SEED_DIRS = {20: "cifar_resnet_depth", 50: "cifar_resnet_depth_50ep", 100: "cifar_resnet_depth_100ep"}
SEED_BEGIN, SEED_END = "<!-- seedtable:begin -->", "<!-- seedtable:end -->"
DEPTHS = (20, 32, 44, 56)  # the degradation figure: plain<d> and resnet<d> of results/cifar_resnet_depth
NOTE = ("Ours: the evaluated checkpoint's test top-1 (error rows: 100 - top-1), in %; over seeds "
        "mean ± std (sample std, ddof=1) of n runs; \"–\": not yet run. Written from results/ by "
        "studies/report.py.")


def pct(v):
    """A fraction as a percentage with 2 decimals, rounded as compare.py's tables do."""
    return f"{v:.2%}"[:-1]


def hardware(ev):
    """'1-thread CPU' (torch's thread count, all an eval.json records of a CPU) or the GPU's name."""
    if ev.get("device_type") == "cpu":
        m = re.search(r"\((\d+) threads\)$", ev.get("device") or "")
        return f"{m[1]}-thread CPU" if m else "CPU"
    return ev.get("device") or "unknown device"


def diverged_names(study_dir):
    """The runs listed in the study's diverged.txt."""
    path = study_dir / "diverged.txt"
    return path.read_text().split() if path.is_file() else []


def find_runs(study_dir, name):
    """(finished, diverged): finished = [(dir, eval.json, config.json)] of `name` and `name-seed<S>`,
    diverged = [(dir, config.json)] of those listed in the study's diverged.txt. ValueError
    '<file>: <what>' for a file of the wrong shape: a run left out would make a cell wrong."""
    pattern, listed = re.compile(re.escape(name) + r"(-seed\d+)?"), diverged_names(study_dir)
    finished, diverged = [], []
    for d in sorted(study_dir.iterdir()) if study_dir.is_dir() else []:
        if not (d.is_dir() and pattern.fullmatch(d.name)):
            continue
        config = read_object(d / "config.json") if (d / "config.json").is_file() else {}
        if d.name in listed:
            diverged.append((d, config))
        elif (d / "eval.json").is_file():
            finished.append((d, read_report(d / "eval.json"), config))
    return finished, diverged


def check_one_config(runs):
    """Stop when runs pooled as seeds of one configuration differ in anything but RUNTIME_KEYS
    (or share a seed); runs: [(dir, config.json dict)]."""
    for d, c in runs:
        if not c:
            raise ValueError(f"{d} has no config.json: cannot tell its configuration")
    if len(runs) < 2 or len(group_runs([{"config": c} for _, c in runs])) == 1:
        return
    names = ", ".join(d.name for d, _ in runs)
    first = runs[0][1]
    other = next((c for _, c in runs[1:] if config_key(c) != config_key(first)), None)
    if other is None:
        raise ValueError(f"{names} are pooled as seeds of one run but share a seed")
    keys = sorted(k for k in {*first, *other} if k not in RUNTIME_KEYS and first.get(k) != other.get(k))
    raise ValueError(f"{names} are pooled as seeds of one run but differ in: {', '.join(keys)}")


def slot(study_dir, name, metric):
    """One published figure's counterpart: dict(text, epochs, hardware) or None when not run."""
    finished, diverged = find_runs(study_dir, name)
    if not finished and not diverged:
        return None
    check_one_config([(d, c) for d, _, c in finished] + [(d, c) for d, c in diverged])
    values = [e["top1"] if metric == "top1" else 1 - e["top1"] for _, e, _ in finished]
    mean, std = mean_std(values)
    n, k = len(finished), len(diverged)
    if n == 0:
        text = "diverged" if k == 1 else f"diverged ({k} of {k})"
    else:
        text = pct(mean) + (f" ± {pct(std)}" if std is not None else "")
        extra = ([f"n={n}"] if n > 1 else []) + ([f"{k} diverged"] if k else [])
        text += f" ({', '.join(extra)})" if extra else ""
    epochs = {c.get("epochs") for _, _, c in finished} | {c.get("epochs") for _, c in diverged}
    return {"text": text, "epochs": "/".join(sorted(str(e) for e in epochs if e is not None)) or "?",
            "hardware": {hardware(e) for _, e, _ in finished}}


def ours(results, study, names, metric):
    slots = [slot(results / study, name, metric) for name in names]
    if not any(slots):
        return "not yet run"
    known = set().union(*(s["hardware"] for s in slots if s))
    if not known:  # every run diverged: the study's other runs ran on the same machine
        known = {hardware(read_report(p)) for p in sorted((results / study).glob("*/eval.json"))}
    epochs = [s["epochs"] if s else "–" for s in slots]
    filled = {e for e in epochs if e != "–"}
    budget = f"{filled.pop()} epochs" if len(filled) == 1 else f"{' / '.join(epochs)} epochs"
    label = ", ".join(sorted(known) + [budget]) if known else budget
    return f"{' / '.join(s['text'] if s else '–' for s in slots)} {UNITS[metric]} ({label})"


def block(results):
    """The markdown between the README's markers (markers excluded)."""
    lines = ["| study | rows | published | ours |", "|---|---|---|---|"]
    for study, rows, published, folder, names, metric in TABLE:
        cells = (study, rows, published, ours(Path(results), folder, names, metric))
        lines.append("|" + "|".join(f" {c} " if c else " " for c in cells) + "|")
    return "\n".join(lines) + "\n\n" + textwrap.fill(NOTE, 95) + "\n"


def seed_block(results):
    """The seed report's table 1 as it printed it (rows: depth; columns: epochs), ours beside theirs."""
    lines = ["| test error (%), ours / seed report | 20 epochs | 50 epochs | 100 epochs |", "|---|--:|--:|--:|"]
    hw = set()
    for depth, published in SEED.items():
        cells = []
        for (epochs, folder), theirs, secs in zip(SEED_DIRS.items(), published, SEED_SECONDS.get(depth, (None,) * 3)):
            run = Path(results) / folder / f"resnet{depth}"
            ev = read_report(run / "eval.json") if (run / "eval.json").is_file() else None
            if ev is not None and read_object(run / "config.json").get("epochs") != epochs:
                raise ValueError(f"{run}/config.json: not a {epochs}-epoch run")
            hw |= {hardware(ev)} if ev else set()
            ours = pct(1 - ev["top1"]) if ev else "–"
            t_ours = f"{ev['train_seconds'] / 60:.1f}" if ev and ev.get("train_seconds") else "–"
            t = f" ({t_ours} / {secs / 60:.1f} min)" if secs else f" ({t_ours} min)" if ev else ""
            cells.append(f"{ours} / {theirs:.2f}{t}")
        lines.append(f"| ResNet-{depth} | " + " | ".join(cells) + " |")
    note = (f"Ours: CIFAR-10 (the JPEG copy), {', '.join(sorted(hw)) or 'not yet run'}, the ResNet paper's recipe "
            "with lr / 10 at 50% and 75% of the epochs; theirs: the seed report's table 1. In parentheses the "
            "training time, ours / theirs (theirs given for ResNet-20 only, on their GPU). \"–\": not yet run. "
            "Written from results/ by studies/report.py.")
    return "\n".join(lines) + "\n\n" + textwrap.fill(note, 95) + "\n"


def degradation(results):
    """results/cifar_resnet_depth/degradation.png: training (dashed) and test error per epoch, one line
    per depth, plain | ResNet (the ResNet paper's figure 6 on this budget); None without runs."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    study = Path(results) / "cifar_resnet_depth"
    runs = {(kind, d): read_history(study / f"{kind}{d}") for kind in ("plain", "resnet") for d in DEPTHS
            if (study / f"{kind}{d}" / "metrics.csv").is_file()}
    if not runs:
        return None
    fig = Figure(figsize=(11, 4.2), dpi=100)
    axes = dict(zip(("plain", "resnet"), fig.subplots(1, 2, sharey=True)))
    for (kind, d), rows in runs.items():
        color = f"C{DEPTHS.index(d)}"
        ep = [r["epoch"] for r in rows]
        axes[kind].plot(ep, [100 * (1 - r["train_acc"]) for r in rows], "--", color=color, linewidth=1)
        axes[kind].plot(ep, [100 * (1 - r["test_top1"]) for r in rows], "-", color=color, label=f"{kind}-{d}")
    for kind, ax in axes.items():
        ax.set(xlabel="epoch", title=f"{'plain' if kind == 'plain' else 'ResNet'} (dashed: training, "
               "bold: test)", ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes["plain"].set_ylabel("error (%)")
    fig.tight_layout()
    path = study / "degradation.png"
    save_figure(fig, path)
    return path


def replace_block(text, new, begin=BEGIN, end=END):
    """README text with the part between `begin` and `end` replaced by `new`."""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"README needs one {begin} line followed by one {end} line")
    head, rest = text.split(begin)
    return head + begin + "\n" + new + end + rest.split(end, 1)[1]


def compare(study_dir):
    """compare.py's comparison over the finished runs of a study folder (see the docstring)."""
    study_dir = Path(study_dir)
    listed = diverged_names(study_dir)
    runs = load_run_dirs(d for d in sorted(study_dir.iterdir()) if (d / "eval.json").is_file()
                         and d.name not in listed)
    if len(runs) < 2:
        raise ValueError(f"{study_dir}: {len(runs)} readable run folder(s); a comparison needs 2")
    order = {}  # checkpoint -> its place in the old table
    if (study_dir / "comparison.csv").is_file():
        with open(study_dir / "comparison.csv", newline="") as f:
            for row in csv.DictReader(f):
                for c in (row.get("checkpoint") or "").split(";"):
                    order.setdefault(c, len(order))
    runs.sort(key=lambda r: order.get(r["report"].get("checkpoint"), len(order)))  # stable: new ones by name
    table, figures = comparison(runs, study_dir)
    print(table + f"wrote {study_dir}/ comparison.csv comparison.md comparison_runs.csv comparison_runs.md "
          + " ".join(figures))


def get_args_parser():
    p = argparse.ArgumentParser(description="Write the README's study table from results/.")
    p.add_argument("--results", default=str(REPO / "results"), help="results folder (default: the repo's)")
    p.add_argument("--readme", default=str(REPO / "README.md"), help="README to --write / --check")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update the README's marked block")
    mode.add_argument("--check", action="store_true", help="exit 1 if the README's block differs")
    mode.add_argument("--compare", nargs="+", metavar="STUDY_DIR",
                      help="rebuild these study folders' comparison tables and figures from their runs' "
                           "files")
    return p


def main(args):
    if args.compare:
        for d in args.compare:
            compare(d)
        return 0
    new, seeds = block(args.results), seed_block(args.results)
    if not (args.write or args.check):
        print(new + "\n" + seeds, end="")
        return 0
    readme = Path(args.readme)
    text = readme.read_text()
    updated = replace_block(text, new)
    if SEED_BEGIN in text:
        updated = replace_block(updated, seeds, SEED_BEGIN, SEED_END)
    if args.check and updated != text:
        print(f"error: {readme}'s results block differs from {args.results}; run "
              "python studies/report.py --write", file=sys.stderr)
        return 1
    if args.write:
        figure = degradation(args.results)
        if figure:
            print(f"wrote {figure}")
        if updated != text:
            write_text(readme, updated)
        print(f"wrote the results block of {readme}" if updated != text else f"{readme} is up to date")
    return 0


def cli(argv=None):
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
