"""Evaluate checkpoints: accuracy, per-class metrics, confusion matrix, plots, timing.

    python evaluate.py runs/cifar10-resnet20-20250101-120000/best.pt --tta --summary
    python evaluate.py runs/depth-*/best.pt --out results/depth   # + compare.py's tables and figures

Per checkpoint, eval.json, confusion_matrix.csv/.png, misclassified.png and summary.txt go to --out for
one checkpoint, --out/<run dir> for several (<run dir>-<stem> when run dirs repeat), else the checkpoint's
folder (eval-<stem>/ in it when checkpoints share it); compare.py compares several in --out or their common
folder. The test data is the checkpoint's (--dataset / --data-dir override it); details: docs/training.md.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, checkpoint_data, load_checkpoint, model_from_checkpoint
from compare import comparison, human, read_history, save_figure, write_csv
from data import DATASETS, make_loader
from models import count_macs
from runtime import (device_name, dtype_name, ensure_fits, forward_bytes, median_p90, number, pick_amp,
                     pick_channels_last, pick_device, run_cli, time_calls, write_text)


def target_rank(logits, targets):
    """0-based rank of each target in its row of logits (N x C), ties to the lower index; C (a miss at
    every k) for a row with a non-finite logit (NaN compares "not greater": the target would be first)."""
    t = logits.gather(1, targets[:, None])  # N x 1
    idx = torch.arange(logits.shape[1], device=logits.device)
    above = (logits > t) | ((logits == t) & (idx < targets[:, None]))  # N x C
    return above.sum(1).masked_fill_(~logits.isfinite().all(1), logits.shape[1])  # N


def confusion_matrix(preds, targets, num_classes):
    """C x C int64 counts on the device, rows true, columns predicted, -1 in none. 1-D scatter_add_, not
    bincount: CUDA bincount syncs to read its max; 1-D scatter_add_ is deterministic in deterministic mode."""
    flat = targets.long() * num_classes + preds.long().clamp(min=0)
    return flat.new_zeros(num_classes ** 2).scatter_add_(0, flat, (preds >= 0).long()).view(num_classes, -1)


def per_class_metrics(cm, classes, support=None):
    """Precision/recall/F1/support per class and macro averages: precision 0.0 for a class never predicted,
    recall and F1 None (not averaged) for one absent from the labels. support: samples per true class, when
    some have no column in cm; default: cm's row sums."""
    cm = torch.as_tensor(cm).long().cpu()
    tp, predicted = cm.diag().tolist(), cm.sum(0).tolist()
    support = cm.sum(1).tolist() if support is None else torch.as_tensor(support).long().tolist()
    rows = []
    for c, name in enumerate(classes):
        p = tp[c] / predicted[c] if predicted[c] else 0.0
        r = tp[c] / support[c] if support[c] else None
        f1 = None if r is None else (2 * p * r / (p + r) if p + r else 0.0)
        rows.append({"class": name, "precision": p, "recall": r, "f1": f1, "support": support[c]})
    present = [row for row in rows if row["support"] > 0]
    return {"per_class": rows, "macro": {k: sum(row[k] for row in present) / len(present) if present else None
                                         for k in ("precision", "recall", "f1")}}


def forward(model, x, amp_dtype=None, tta=False):
    """Float32 logits N x C; with tta, log of the mean softmax over x and its horizontal flip (whose argmax
    and cross-entropy are those of the averaged softmax)."""
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        outs = [model(v) for v in ((x, x.flip(-1)) if tta else (x,))]
    outs = [(o[0] if isinstance(o, (tuple, list)) else o).float() for o in outs]  # aux heads dropped
    return torch.logsumexp(torch.stack([o.log_softmax(1) for o in outs]), 0) - math.log(2) if tta else outs[0]


@torch.no_grad()
def evaluate(model, loader, num_classes, *, amp_dtype=None, tta=False, keep_predictions=False):
    """One pass, sums on the device: {loss, top1, top5, n, nonfinite_outputs, confusion_matrix (CPU),
    support (samples per true class)}; keep_predictions adds per-sample preds (-1: non-finite logits),
    confidence (softmax of the prediction, 0.0 for -1), targets (CPU). The model's mode is kept."""
    was_training = model.training
    model.eval()
    n, acc, kept = 0, None, []
    for x, y in loader:
        logits = forward(model, x, amp_dtype, tta)  # N x C
        rank = target_rank(logits, y)
        bad = ~logits.isfinite().all(1)  # N
        preds = logits.argmax(1).masked_fill_(bad, -1)
        batch = (torch.stack([F.cross_entropy(logits, y, reduction="sum"), (rank < 1).sum().float(),
                              (rank < min(5, num_classes)).sum().float(), bad.sum().float()]),
                 confusion_matrix(preds, y, num_classes),
                 y.new_zeros(num_classes).scatter_add_(0, y, torch.ones_like(y)))  # samples per class
        acc = batch if acc is None else [a + b for a, b in zip(acc, batch)]
        n += y.shape[0]
        if keep_predictions:
            kept.append((preds, logits.softmax(1).amax(1).masked_fill_(bad, 0.0), y))
    model.train(was_training)
    (loss, top1, top5, nonfinite), cm, support = acc[0].tolist(), acc[1], acc[2]  # the one host sync
    result = {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "n": n,
              "nonfinite_outputs": int(nonfinite), "confusion_matrix": cm.cpu(), "support": support.cpu()}
    if keep_predictions:
        result.update(zip(("preds", "confidence", "targets"), (torch.cat(t).cpu() for t in zip(*kept))))
    return result


def benchmark(model, input_shape, *, batch_size=256, amp_dtype=None, channels_last=False):
    """Median / p90 latency at batch 1 (ms) and images/s at batch_size on random inputs on the model's
    device; on CUDA with cudnn.benchmark on (each shape's fastest convolution, as onnxruntime finds)."""
    device = next(model.parameters()).device
    cuda, was = device.type == "cuda", torch.backends.cudnn.benchmark

    def timed(b, warmup, repeats, seconds):  # CUDA warm-ups also cover cuDNN autotuning / lazy init
        x = torch.randn(b, *input_shape, device=device)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        return time_calls(lambda: forward(model, x, amp_dtype), device=device, warmup=warmup,
                          repeats=repeats, max_seconds=seconds)

    torch.backends.cudnn.benchmark = was or cuda
    try:
        lat = timed(1, *((20, 200, 5.0) if cuda else (3, 20, 1.0)))
        thr = timed(batch_size, *((5, 30, 5.0) if cuda else (1, 5, 2.0)))
    finally:
        torch.backends.cudnn.benchmark = was
    lat_med, lat_p90 = median_p90(lat)
    return {"latency_ms_batch1": lat_med * 1000, "latency_ms_batch1_p90": lat_p90 * 1000,
            "images_per_second": batch_size / median_p90(thr)[0], "timing_batch_size": batch_size,
            "timing_repeats": [len(lat), len(thr)], "cudnn_benchmark": True if cuda else None}


def model_summary(model, input_shape, name=""):
    """(text, params, macs): a table of the leaf modules' output shapes and parameters at batch 1, totals."""
    names, rows, seen = {m: n for n, m in model.named_modules() if not any(m.children())}, [], set()

    def hook(module, inputs, out):
        out = out[0] if isinstance(out, (tuple, list)) else out
        shape = " x ".join(map(str, out.shape[1:])) if torch.is_tensor(out) else type(out).__name__
        params = 0 if module in seen else sum(p.numel() for p in module.parameters(recurse=False))
        seen.add(module)  # a module run twice (a shared ReLU) counts its parameters once
        rows.append((names[module], type(module).__name__, shape, params))

    hooks = [m.register_forward_hook(hook) for m in names]
    model.eval()(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    params, macs = sum(p.numel() for p in model.parameters()), count_macs(model, (1, *input_shape))
    table = [("layer", "type", "output shape", "parameters")] + [(*r[:3], f"{r[3]:,}") for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = ["  ".join([a.ljust(widths[0]), b.ljust(widths[1]), c.rjust(widths[2]), d.rjust(widths[3])])
             for a, b, c, d in table]
    rule, missing = "-" * (sum(widths) + 6), params - sum(r[3] for r in rows)
    text = [f"{name} (input {' x '.join(map(str, input_shape))})", lines[0], rule, *lines[1:], rule,
            f"total parameters: {params:,} ({human(params)})",
            f"forward MACs per image: {macs:,} ({human(macs)})",
            *([f"parameters of modules not run in eval mode or not leaves: {missing:,}"] if missing else [])]
    return "\n".join(text) + "\n", params, macs


def write_json(report, path):
    """indent=2 JSON with each confusion-matrix row on one line (100 x 100 stays readable)."""
    rows = ",\n    ".join(json.dumps(row) for row in report["confusion_matrix"])
    text = json.dumps({**report, "confusion_matrix": "\0"}, indent=2)
    write_text(path, text.replace('"\\u0000"', f"[\n    {rows}\n  ]") + "\n")


def plot_confusion_matrix(cm, classes, path):
    """Counts and row-normalized (recall) heatmaps side by side; cells annotated up to 20 classes."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    cm, c = torch.as_tensor(cm).double(), len(classes)
    cell = 0.55 if c <= 20 else max(0.12, 12 / c)  # inches per cell
    font = 9 if c <= 20 else max(4, min(8, 72 * cell * 0.8))
    side, label = max(4.0, c * cell), max(len(s) for s in classes) * font / 72 * 0.6 + 0.8  # + tick labels
    fig = Figure(figsize=(2 * (side + label) + 2.5, side + label + 0.8), dpi=100, layout="tight")
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    for ax, values, title in zip(fig.subplots(1, 2), (cm, norm), ("counts", "row-normalized (recall)")):
        fig.colorbar(ax.imshow(values.numpy(), cmap="Blues", interpolation="nearest", vmin=0,
                               vmax=1 if values is norm else None), ax=ax, fraction=0.046, pad=0.04)
        ax.set(title=title, xlabel="predicted", ylabel="true")
        ax.set_xticks(range(c), classes, rotation=90, fontsize=font)
        ax.set_yticks(range(c), classes, fontsize=font)
        for i, j in ((i, j) for i in range(c) for j in range(c)) if c <= 20 else ():  # annotated up to 20
            v = values[i, j].item()
            ax.text(j, i, f"{int(v)}" if values is cm else f"{v:.2f}", ha="center", va="center",
                    fontsize=font - 1, color="white" if v > (values.max().item() or 1) / 2 else "black")
    save_figure(fig, path, bbox_inches="tight")


def plot_misclassified(images, preds, targets, confidence, classes, path):
    """Wrong predictions (C x H x W in [0, 1], most confident first): one labelled mosaic, not 36 axes."""
    from matplotlib.figure import Figure
    from torchvision.utils import make_grid

    if not images:
        fig = Figure(figsize=(4, 1), dpi=100)
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        return save_figure(fig, path)
    cols, cell, (_, h, w) = min(6, len(images)), 1.7, images[0].shape  # tiles per row, inches per tile
    up = max(1, math.ceil(64 / max(h, w)))  # nearest-neighbour upscaling: crisp small digits
    h, w = h * up, w * up
    band, pad = math.ceil(0.42 * w / cell), math.ceil(0.08 * w / cell)  # label band, gap (pixels)
    tiles = [F.pad(x.clamp(0, 1).repeat_interleave(up, 1).repeat_interleave(up, 2), (0, 0, band, 0),
                   value=1.0) for x in images]  # each with its label band on top
    grid = F.pad(make_grid(tiles, nrow=cols, padding=pad, pad_value=1.0), (0, 0, band, 0), value=1.0)
    fig = Figure(figsize=(grid.shape[2] / w * cell, grid.shape[1] / w * cell), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(grid.permute(1, 2, 0).numpy(), vmin=0, vmax=1, interpolation="nearest")
    ax.text(grid.shape[2] / 2, band / 2, "most confident mistakes: predicted (softmax confidence) vs true",
            ha="center", va="center", fontsize=9)
    short = [name if len(name) <= 20 else name[:19] + "…" for name in classes]
    for i, (p, t, conf) in enumerate(zip(preds, targets, confidence)):
        r, k = divmod(i, cols)
        pred = f"{short[p]} ({conf:.1%})" if p >= 0 else "none (NaN/inf)"
        ax.text(pad + k * (w + pad) + w / 2, band + pad + r * (band + h + pad) + band - 1,
                f"pred: {pred}\ntrue: {short[t]}", ha="center", va="bottom", fontsize=7)
    save_figure(fig, path)


def output_dirs(paths, out):
    """One output folder per checkpoint (rules in the module docstring)."""
    paths = [Path(p).resolve() for p in paths]
    if out is not None and len(paths) == 1:
        return [Path(out)]
    if out is None:
        parents = [p.parent for p in paths]
        return [p.parent / f"eval-{p.stem}" if parents.count(p.parent) > 1 else p.parent for p in paths]
    names = [p.parent.name or p.stem for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}-{p.stem}" for p in paths]
    names = [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return [Path(out) / n for n in names]


@torch.no_grad()  # benchmark() and model_summary() too
def evaluate_checkpoint(path, out, args, device):
    """One checkpoint's metrics, files and timing; returns its run for compare.py (report: eval.json's)."""
    ck = load_checkpoint(path)
    if args.ema and not ck["ema"]:
        print(f"note: {path} has no EMA weights; evaluating the model weights", file=sys.stderr)
    model = model_from_checkpoint(ck, ema=args.ema)  # the model weights when there is no EMA
    shape = (ck["in_channels"], ck["image_size"], ck["image_size"])
    per_image, size = forward_bytes(model, shape), "x".join(map(str, shape))
    ensure_fits(per_image, device, f"one {size} image", "the checkpoint's image_size is too large here")
    data = checkpoint_data(ck, path, dataset=args.dataset, data_dir=args.data_dir, download=args.download)
    split = getattr(data, args.split)  # val or test
    if split is None:
        raise ValueError(f"--split val: {path} was trained without a validation split "
                         f"(val_split={ck['args'].get('val_split') or 0}); use --split test")
    batch = min(args.batch_size, len(split)) if args.no_timing else args.batch_size  # before the long pass
    ensure_fits(per_image * batch, device, f"a batch of {batch} {size} images",
                "use a smaller --batch-size" + ("" if args.no_timing else " or --no-timing"))
    classes = ck["classes"] or list(data.classes)
    cl = pick_channels_last("auto", device)[0] if args.channels_last is None else args.channels_last
    model = model.to(device, memory_format=torch.channels_last if cl else torch.preserve_format)
    amp = pick_amp(args.amp, device)[0]
    loader = make_loader(split, mean=ck["mean"] or data.mean, std=ck["std"] or data.std,  # the training's
                         batch_size=args.batch_size, train=False, device=device, channels_last=cl)
    res = evaluate(model, loader, ck["num_classes"], amp_dtype=amp, keep_predictions=True)
    tta = evaluate(model, loader, ck["num_classes"], amp_dtype=amp, tta=True) if args.tta else None
    bad = max(res["nonfinite_outputs"], tta["nonfinite_outputs"] if tta else 0)
    if bad:
        print(f"warning: {path}: the model produced non-finite logits (NaN or infinity) for {bad} of "
              f"{res['n']} images; they count as wrong (damaged or diverged weights?)", file=sys.stderr)
    summary, params, macs = model_summary(model, shape, ck["model_name"])
    timing = dict.fromkeys(("latency_ms_batch1", "latency_ms_batch1_p90", "images_per_second",
                            "timing_batch_size", "timing_repeats", "cudnn_benchmark"))
    if not args.no_timing:
        timing = benchmark(model, shape, batch_size=args.batch_size, amp_dtype=amp, channels_last=cl)
    out.mkdir(parents=True, exist_ok=True)
    cm = res["confusion_matrix"]
    write_csv(out / "confusion_matrix.csv", ["true \\ predicted", *classes],
              [[c, *row] for c, row in zip(classes, cm.tolist())])
    plot_confusion_matrix(cm, classes, out / "confusion_matrix.png")
    wrong = (res["preds"] != res["targets"]).nonzero().flatten()
    wrong = wrong[res["confidence"][wrong].argsort(descending=True, stable=True)][:36].tolist()
    images = [(split.images[i] if split.images is not None else split.reader(split.files[i])).float() / 255
              for i in wrong]  # what the model saw, before normalization
    plot_misclassified(images, *(res[k][wrong].tolist() for k in ("preds", "targets", "confidence")), classes,
                       out / "misclassified.png")
    write_text(out / "summary.txt", summary)
    if args.summary:
        print(summary)
    finite = lambda v: v if math.isfinite(v) else None  # noqa: E731 (NaN is no JSON)
    tta = tta and {k: finite(tta[k]) for k in ("top1", "top5", "loss", "nonfinite_outputs")}
    seconds = [h["epoch_seconds"] for h in ck["history"] if isinstance(h.get("epoch_seconds"), (int, float))]
    report = {
        "checkpoint": str(path), "model": ck["model_name"], "model_options": ck["model_options"],
        "dataset": data.name, "split": args.split, "n": res["n"], "epoch": ck["epoch"],
        "weights": "ema" if args.ema and ck["ema"] else "model", "top1": res["top1"], "top5": res["top5"],
        "loss": finite(res["loss"]), "nonfinite_outputs": res["nonfinite_outputs"],
        "tta": tta, "tta_top1": tta and tta["top1"], "tta_top5": tta and tta["top5"],
        **per_class_metrics(cm, classes, res["support"]), "confusion_matrix": cm.tolist(), "classes": classes,
        "params": params, "macs": macs, **timing, "device": device_name(device), "device_type": device.type,
        "torch": torch.__version__, "amp": dtype_name(amp), "channels_last": cl,
        "tf32": {"conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
        if device.type == "cuda" else None, "train_seconds": sum(seconds) if seconds else None}
    write_json(report, out / "eval.json")
    print(f"{path}: {ck['model_name']} on {data.name} ({args.split}, {res['n']} images, epoch {ck['epoch']}, "
          f"{report['weights']} weights): top-1 {res['top1']:.2%}  top-5 {res['top5']:.2%}  "
          f"loss {res['loss']:.4f}" + (f"\n  flip-TTA: top-1 {tta['top1']:.2%}  top-5 {tta['top5']:.2%}"
                                        if tta else ""))
    print(f"  params {human(params)}  MACs {human(macs)}" + ("" if args.no_timing else
          f"  latency b1 {timing['latency_ms_batch1']:.2f} ms (p90 {timing['latency_ms_batch1_p90']:.2f})  "
          f"{timing['images_per_second']:,.0f} img/s at batch {args.batch_size} ({report['amp']}"
          f"{', channels_last' if cl else ''})") + f"  [{report['device']}]")
    print(f"  wrote {out}/ eval.json confusion_matrix.csv confusion_matrix.png misclassified.png summary.txt")
    built = {k: ck[k] for k in ("model_options", "num_classes", "in_channels", "image_size", "classes")}
    return {"label": f"{Path(path).parent.name}/{Path(path).name}", "report": report,
            "config": {**ck["args"], **built} if ck["args"] else {}, "history": ck["history"]}


def get_args_parser():
    doc = __doc__.split("\n\n")  # the docstring's commands and output rules
    p = argparse.ArgumentParser(description=doc[2], epilog="examples:\n" + doc[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--data-dir", default=None, help="default: the one recorded in the checkpoint")
    p.add_argument("--dataset", default=None, choices=sorted(DATASETS), help="default: the checkpoint's")
    p.add_argument("--download", action="store_true", help="download the dataset when missing")
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: cuda, then mps (Apple silicon), then cpu")
    p.add_argument("--batch-size", type=number(int, 1), default=256, help="eval and throughput batch (>= 1)")
    p.add_argument("--out", default=None, help="output folder (see above)")
    p.add_argument("--tta", action="store_true", help="also report horizontal-flip TTA accuracy")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast dtype of the pass and timing; auto: fp32 (the fp32 ONNX export's metrics)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC layout for the pass and timing; default: training's (on for CUDA and the CPU)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights when present")
    p.add_argument("--no-timing", action="store_true", help="skip latency/throughput timing")
    p.add_argument("--summary", action="store_true", help="print the model's layer table")
    return p


def main(args):
    for path in (p for p in args.checkpoints if not os.path.isfile(p)):  # before any long work, on a typo
        raise CheckpointError(f"checkpoint not found: {path}")
    device = pick_device(args.device)
    runs = [evaluate_checkpoint(p, o, args, device)
            for p, o in zip(args.checkpoints, output_dirs(args.checkpoints, args.out))]
    if len(runs) > 1:
        for r in runs:  # metrics.csv has every epoch; best.pt's history stops at its epoch
            try:
                r["history"] = read_history(Path(r["report"]["checkpoint"]).parent, r["history"])
            except ValueError as e:
                print(f"warning: {e}; using the checkpoint's history", file=sys.stderr)
        out_dir = Path(args.out) if args.out else Path(os.path.commonpath(
            [str(Path(p).resolve().parent) for p in args.checkpoints]))
        table, figures = comparison(runs, out_dir)
        print("\n" + table + f"wrote {out_dir}/ comparison.csv comparison.md comparison_runs.csv "
              f"comparison_runs.md {' '.join(figures)}")
    return runs


def cli(argv=None):
    return run_cli(main, get_args_parser(), argv, oom_hint="the model or a batch is too large for this "
                   "device; use a smaller --batch-size (or --no-timing)")


if __name__ == "__main__":
    sys.exit(cli())
