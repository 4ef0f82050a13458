"""Evaluate checkpoints: accuracy, per-class metrics, confusion matrix, plots, timing.

    python evaluate.py runs/cifar10-resnet20-20250101-120000/best.pt --tta --summary
    python evaluate.py runs/depth-*/best.pt --out results/depth   # + one comparison table

The test data is rebuilt from the checkpoint alone (dataset, data dir, image size, channels,
val split, seed, limit_test, mean/std); --dataset / --data-dir override it. Per checkpoint,
the output folder gets eval.json, confusion_matrix.csv/.png, misclassified.png, summary.txt.
Output folder: --out for one checkpoint; --out/<run dir> for several (<run dir>-<stem> when
run dirs repeat); without --out, the checkpoint's own folder (eval-<stem>/ inside it when
several given checkpoints share that folder). Several checkpoints also give, in --out or without
--out in the checkpoints' common parent folder: comparison.csv / .md (one row per configuration:
runs that differ only in --seed pooled as mean +- std, see group_runs), comparison_runs.csv / .md
(one row per checkpoint), curves.png and tradeoff.png (figures over the runs).
The data is never downloaded here unless --download is given.

Metric conventions (pure functions below, tested against hand-computed values):
- top-1 prediction = argmax of the logits; among tied logits the lowest class index wins.
- top-k: the target's rank is the number of classes with a larger logit plus the number of
  tied classes with a lower index (same tie rule as argmax); a hit when rank < k. k larger
  than the class count is clipped to it (top-5 on 3 classes is 1.0; the key stays "top5").
- non-finite outputs: a row with any NaN or infinite logit predicts nothing: it is wrong for
  top-1 and top-5 (rank = C), its prediction is -1 (no class), it has no column in the
  confusion matrix (that row of the matrix sums to less than the class's support) and counts
  in "nonfinite_outputs"; evaluate.py then prints a warning line. The loss becomes NaN.
- confusion matrix: rows = true class, columns = predicted class.
- precision of a class never predicted = 0.0; recall and F1 of a class absent from the
  labels (support 0) = None (undefined), and macro averages run over the classes with
  support > 0. F1 = 0.0 when precision + recall = 0.

train.py imports evaluate(model, loader, num_classes) for its per-epoch pass.

Why one file of ~870 lines (over the ~650 this repo aims for): the metric functions (pure,
each tested against hand-computed values or scikit-learn), the per-checkpoint outputs, and the
several-checkpoint comparison (seed groups, curves.png, tradeoff.png) all work from the same
per-run record; the comparison is what the studies' one-command reports call.
"""
import argparse
import csv
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from data import DATASETS, load_data, make_loader, match_classes
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from models import count_macs
from runtime import (device_name, ensure_fits, forward_bytes, int_range, median_p90,
                     out_of_memory_as_error, pick_amp, pick_device, run_cli, time_calls)

# ----------------------------------------------------------------------------- metrics

def target_rank(logits, targets):
    """0-based rank of each target class in its row of logits (N x C), ties to the lower index;
    C (a miss at every k) for a row with any non-finite logit (NaN compares as "not greater",
    which would otherwise rank the target first)."""
    t = logits.gather(1, targets[:, None])  # N x 1
    idx = torch.arange(logits.shape[1], device=logits.device)
    above = (logits > t) | ((logits == t) & (idx < targets[:, None]))  # N x C
    return above.sum(1).masked_fill_(~logits.isfinite().all(1), logits.shape[1])  # N


def topk_accuracy(logits, targets, ks=(1, 5)):
    """Fraction of rows whose target is among the top-k logits, for each k (clipped to C)."""
    rank = target_rank(logits, targets)
    return [(rank < min(k, logits.shape[1])).sum().item() / len(rank) for k in ks]


def confusion_matrix(preds, targets, num_classes):
    """C x C int64 counts, rows = true class, columns = predicted class (stays on device).
    A prediction of -1 (no class: non-finite logits) is counted in no column.

    1-D scatter_add_ rather than bincount: CUDA bincount reads its max back to the host (a
    sync per batch), and 1-D scatter_add_ is deterministic under torch's deterministic mode."""
    preds, targets = preds.long(), targets.long()
    counted = preds >= 0
    flat = targets * num_classes + preds.clamp(min=0)
    cm = torch.zeros(num_classes * num_classes, dtype=torch.long, device=flat.device)
    return cm.scatter_add_(0, flat, counted.long()).view(num_classes, num_classes)


def per_class_metrics(cm, classes=None, support=None):
    """Precision/recall/F1/support per class and their macro averages from a confusion matrix.

    Never-predicted class: precision 0.0. Class absent from the labels: recall and F1 None,
    and it is left out of the macro averages (which run over classes with support > 0).
    support: samples per true class when some have no column in cm (non-finite outputs);
    default: the row sums of cm.
    """
    cm = torch.as_tensor(cm).long().cpu()
    classes = classes or [str(i) for i in range(len(cm))]
    tp, predicted = cm.diag().tolist(), cm.sum(0).tolist()
    support = cm.sum(1).tolist() if support is None else torch.as_tensor(support).long().tolist()
    rows = []
    for c, name in enumerate(classes):
        p = tp[c] / predicted[c] if predicted[c] else 0.0
        r = tp[c] / support[c] if support[c] else None
        f1 = None if r is None else (2 * p * r / (p + r) if p + r else 0.0)
        rows.append({"class": name, "precision": p, "recall": r, "f1": f1, "support": support[c]})
    present = [row for row in rows if row["support"] > 0]
    macro = {key: (sum(row[key] for row in present) / len(present) if present else None)
             for key in ("precision", "recall", "f1")}
    return {"per_class": rows, "macro": macro}


# ----------------------------------------------------------------------------- the eval pass

def forward(model, x, amp_dtype=None, tta=False):
    """Float32 logits N x C; with tta, log of the mean softmax over x and its horizontal flip."""
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if tta:
            flipped = model(x.flip(-1))
            flipped = flipped[0] if isinstance(flipped, (tuple, list)) else flipped
    if not tta:
        return out.float()
    both = torch.stack([out.float().log_softmax(1), flipped.float().log_softmax(1)])
    return torch.logsumexp(both, 0) - math.log(2)  # log-probs: argmax/CE of the averaged softmax


@torch.no_grad()
def evaluate(model, loader, num_classes, *, amp_dtype=None, tta=False, keep_predictions=False):
    """One pass: {"loss", "top1", "top5", "n", "nonfinite_outputs", "confusion_matrix" (C x C CPU
    tensor), "support" (samples per true class)}.

    Sums stay on the device (no per-batch host sync). "nonfinite_outputs" counts the samples
    whose logits hold a NaN or an infinity: they are wrong at every k, predict -1 and have no
    column in the confusion matrix (module docstring); the loss is then NaN. keep_predictions
    adds per-sample "preds", "confidence" (softmax prob of the prediction, 0.0 for -1) and
    "targets" (CPU tensors, loader order). The model is put in eval mode and its previous mode
    restored afterwards.
    """
    was_training = model.training
    model.eval()
    n, sums, cm, support, kept = 0, None, None, None, []
    for x, y in loader:
        logits = forward(model, x, amp_dtype, tta)  # N x C
        rank = target_rank(logits, y)
        bad = ~logits.isfinite().all(1)  # N
        batch = torch.stack([F.cross_entropy(logits, y, reduction="sum"),
                             (rank < 1).sum().float(), (rank < min(5, num_classes)).sum().float(),
                             bad.sum().float()])
        preds = logits.argmax(1).masked_fill_(bad, -1)
        batch_cm = confusion_matrix(preds, y, num_classes)
        batch_support = torch.zeros(num_classes, dtype=torch.long, device=y.device).scatter_add_(
            0, y.long(), torch.ones_like(y, dtype=torch.long))
        sums = batch if sums is None else sums + batch
        cm = batch_cm if cm is None else cm + batch_cm
        support = batch_support if support is None else support + batch_support
        n += y.shape[0]
        if keep_predictions:
            kept.append((preds, logits.softmax(1).amax(1).masked_fill_(bad, 0.0), y))
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    loss, top1, top5, nonfinite = sums.tolist()  # the one host sync of the pass
    result = {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "n": n,
              "nonfinite_outputs": int(nonfinite), "confusion_matrix": cm.cpu(), "support": support.cpu()}
    if keep_predictions:
        for i, key in enumerate(("preds", "confidence", "targets")):
            result[key] = torch.cat([k[i] for k in kept]).cpu()
    return result


# ----------------------------------------------------------------------------- timing, summary

@torch.no_grad()
def benchmark(model, input_shape, *, batch_size=256, amp_dtype=None, channels_last=False):
    """Median / p90 latency at batch 1 (ms) and throughput at batch_size (images/s) on random
    inputs of shape C x H x W, on the model's device. CPU runs are kept short (bounded time)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def inputs(b):
        return torch.randn(b, *input_shape, device=device).contiguous(memory_format=fmt)

    # (warm-ups, repeats, seconds): CUDA warm-ups also cover cuDNN autotuning / lazy init
    def timed(x, warmup, repeats, seconds):
        return time_calls(lambda: forward(model, x, amp_dtype), device=device, warmup=warmup,
                          repeats=repeats, max_seconds=seconds)

    lat = timed(inputs(1), *((20, 200, 5.0) if cuda else (3, 20, 1.0)))
    thr = timed(inputs(batch_size), *((5, 30, 5.0) if cuda else (1, 5, 2.0)))
    lat_med, lat_p90 = median_p90(lat)
    return {"latency_ms_batch1": lat_med * 1000, "latency_ms_batch1_p90": lat_p90 * 1000,
            "images_per_second": batch_size / median_p90(thr)[0],
            "timing_batch_size": batch_size, "timing_repeats": [len(lat), len(thr)]}


def human(n):
    """12345678 -> '12.35M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@torch.no_grad()
def model_summary(model, input_shape, name=""):
    """Layer table (layer, type, output shape, parameters) from forward hooks on leaf modules
    at batch 1, plus total parameters and forward MACs. Returns (text, params, macs)."""
    model.eval()
    rows, seen, hooks = [], set(), []

    def hook(layer):
        def fn(module, inputs, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            shape = " x ".join(map(str, out.shape[1:])) if torch.is_tensor(out) else type(out).__name__
            params = 0 if layer in seen else sum(p.numel() for p in module.parameters(recurse=False))
            seen.add(layer)  # a module run twice (a shared ReLU) counts its parameters once
            rows.append((layer, type(module).__name__, shape, f"{params:,}"))
        return fn

    for layer, module in model.named_modules():
        if not any(module.children()):
            hooks.append(module.register_forward_hook(hook(layer)))
    device = next(model.parameters()).device
    try:
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, (1, *input_shape))
    header = ("layer", "type", "output shape", "parameters")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    line = lambda r: "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]),  # noqa: E731
                                r[2].rjust(widths[2]), r[3].rjust(widths[3])])
    shape = " x ".join(map(str, input_shape))
    text = [f"{name} (input {shape})", line(header), "-" * (sum(widths) + 6)] + [line(r) for r in rows]
    in_table = sum(int(r[3].replace(",", "")) for r in rows)
    text += ["-" * (sum(widths) + 6), f"total parameters: {params:,} ({human(params)})",
             f"forward MACs per image: {macs:,} ({human(macs)})"]
    if in_table != params:
        text.append(f"parameters of modules not run in eval mode or not leaves: {params - in_table:,}")
    return "\n".join(text) + "\n", params, macs


# ----------------------------------------------------------------------------- files and plots

def finite_or_none(v):
    """A float for eval.json: NaN / infinity (not JSON) become null."""
    return v if v is None or math.isfinite(v) else None


def write_json(report, path):
    """indent=2 JSON with each confusion-matrix row on one line (100 x 100 stays readable)."""
    rows = ["\0" + json.dumps(row) + "\0" for row in report["confusion_matrix"]]
    text = json.dumps({**report, "confusion_matrix": rows}, indent=2)
    Path(path).write_text(re.sub(r'"\\u0000(.*?)\\u0000"', r"\1", text) + "\n")


def write_confusion_csv(cm, classes, path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted"] + list(classes))
        for name, row in zip(classes, cm.tolist()):
            w.writerow([name] + row)


def plot_confusion_matrix(cm, classes, path):
    """Counts and row-normalized (recall) heatmaps side by side; cells annotated up to 20 classes."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    cm = torch.as_tensor(cm).double()
    c = len(classes)
    annotate = c <= 20
    cell = 0.55 if annotate else max(0.12, 12 / c)  # inches per cell
    font = 9 if annotate else max(4, min(8, 72 * cell * 0.8))
    side = max(4.0, c * cell)
    label = max(len(s) for s in classes) * font / 72 * 0.6 + 0.8  # room for tick labels, inches
    fig = Figure(figsize=(2 * (side + label) + 2.5, side + label + 0.8), dpi=100)
    axes = fig.subplots(1, 2)
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    for ax, values, title in ((axes[0], cm, "counts"), (axes[1], norm, "row-normalized (recall)")):
        im = ax.imshow(values.numpy(), cmap="Blues", interpolation="nearest",
                       vmin=0, vmax=1 if values is norm else None)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(c), classes, rotation=90, fontsize=font)
        ax.set_yticks(range(c), classes, fontsize=font)
        if annotate:
            top = values.max().item() or 1
            for i in range(c):
                for j in range(c):
                    v = values[i, j].item()
                    text = f"{int(v)}" if values is cm else f"{v:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=font - 1,
                            color="white" if v > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")


def plot_misclassified(images, preds, targets, confidence, classes, path, max_images=36):
    """Grid of wrong predictions, most confident first. images: list of C x H x W floats in
    [0, 1]. Drawn as one mosaic image with text labels (36 separate axes render slowly)."""
    from matplotlib.figure import Figure

    n = min(len(images), max_images)
    if n == 0:
        fig = Figure(figsize=(4, 1), dpi=100)
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        fig.savefig(path)
        return
    cols, cell = min(6, n), 1.7  # tiles per row; inches per tile
    rows = math.ceil(n / cols)
    c, h, w = images[0].shape
    up = max(1, math.ceil(64 / max(h, w)))  # nearest-neighbour upscaling: crisp small digits
    h, w = h * up, w * up
    band, pad = math.ceil(0.42 * w / cell), math.ceil(0.08 * w / cell)  # label band, gap (pixels)
    ph, pw = band + h + pad, w + pad  # tile pitch
    grid = torch.ones(c, rows * ph, cols * pw)  # white background
    fig = Figure(figsize=(cols * pw / w * cell, (rows * ph + band) / w * cell), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    short = [name if len(name) <= 20 else name[:19] + "…" for name in classes]
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = r * ph + band, k * pw + pad // 2
        img = images[i].clamp(0, 1).repeat_interleave(up, 1).repeat_interleave(up, 2)
        grid[:, top:top + h, left:left + w] = img
        pred = f"{short[preds[i]]} ({confidence[i]:.1%})" if preds[i] >= 0 else "none (NaN/inf)"
        ax.text(left + w / 2, top - 1, f"pred: {pred}\ntrue: {short[targets[i]]}",
                ha="center", va="bottom", fontsize=7)
    grid = torch.cat([torch.ones(c, band, grid.shape[2]), grid], 1)  # room for the title
    ax.imshow((grid[0] if c == 1 else grid.permute(1, 2, 0)).numpy(), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest", extent=(0, grid.shape[2], grid.shape[1] - band, -band))
    ax.text(grid.shape[2] / 2, -band / 2, "most confident mistakes: predicted (softmax "
            "confidence) vs true", ha="center", va="center", fontsize=9)
    fig.savefig(path)


def gather_images(loader, indices, mean, std):
    """Loader-order samples at `indices`, de-normalized back to [0, 1] (what the model saw)."""
    wanted = {int(i): k for k, i in enumerate(indices)}
    out = [None] * len(indices)
    mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    start = 0
    for x, _ in loader:
        if start > max(wanted, default=-1):
            break
        for i in range(start, start + x.shape[0]):
            if i in wanted:
                out[wanted[i]] = x[i - start].float().cpu() * std + mean
        start += x.shape[0]
    return out


# ----------------------------------------------------------------------------- the CLI

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


def recorded_args(ck):
    """The checkpoint's recorded training arguments (a dict; {} when absent or not a dict)."""
    a = ck.get("args")
    return a if isinstance(a, dict) else {}


def checkpoint_classes(ck, path):
    """The checkpoint's class names (None when it records none); one line when they cannot
    label its num_classes outputs."""
    classes = ck.get("classes")
    if classes is None:
        return None
    if not isinstance(classes, (list, tuple)) or len(classes) != ck["num_classes"]:
        n = len(classes) if isinstance(classes, (list, tuple)) else type(classes).__name__
        raise CheckpointError(f"{path} lists {n} class names for its {ck['num_classes']} outputs "
                              "(a damaged or hand-edited checkpoint)")
    return [str(c) for c in classes]


def load_eval_data(ck, path, args):
    """The checkpoint's dataset and split, rebuilt from its recorded arguments, labelled in the
    order of the checkpoint's classes (data.match_classes: same names reordered are mapped,
    other names refused)."""
    a = recorded_args(ck)
    name = args.dataset or a.get("dataset")
    if not name:
        raise ValueError(f"{path} does not record its dataset; pass --dataset")
    data = load_data(name, args.data_dir or a.get("data_dir") or "data", image_size=ck["image_size"],
                     channels=ck["in_channels"], val_split=a.get("val_split") or 0.0,
                     limit_train=a.get("limit_train"), limit_test=a.get("limit_test"),
                     seed=a.get("seed") or 0, download=args.download)
    listed = ck.get("classes")
    if data.num_classes != ck["num_classes"] and not (isinstance(listed, (list, tuple))
                                                      and len(listed) == ck["num_classes"]):
        raise ValueError(f"dataset {name} has {data.num_classes} classes but {path} was trained "
                         f"for {ck['num_classes']}")
    classes = checkpoint_classes(ck, path)
    if classes is not None:  # a different count or other names: one line naming both lists
        data, note = match_classes(data, classes, path)
        if note:
            print(f"note: {note}", file=sys.stderr)
    split = data.val if args.split == "val" else data.test
    if split is None:
        raise ValueError(f"--split val: {path} was trained without a validation split "
                         f"(val_split={a.get('val_split') or 0}); use --split test")
    return name, data, split


def evaluate_checkpoint(path, out, args, device):
    """Everything for one checkpoint: metrics, plots, summary, timing -> the eval.json dict."""
    ck = load_checkpoint(path)
    use_ema = bool(args.ema and ck.get("ema"))
    if args.ema and not use_ema:
        print(f"note: {path} has no EMA weights; evaluating the model weights", file=sys.stderr)
    model = model_from_checkpoint(ck, ema=use_ema)
    input_shape = (ck["in_channels"], ck["image_size"], ck["image_size"])
    per_image = forward_bytes(model, input_shape)
    size = "x".join(map(str, input_shape))
    ensure_fits(per_image, device, f"one {size} image", "the checkpoint's image_size is too large here")
    if not args.no_timing:  # checked before the long eval pass, not after it
        ensure_fits(per_image * args.batch_size, device, f"the timing batch of {args.batch_size} {size} images",
                    "use a smaller --batch-size or --no-timing")
    dataset, data, split = load_eval_data(ck, path, args)
    classes = checkpoint_classes(ck, path) or list(data.classes)
    mean, std = ck.get("mean") or data.mean, ck.get("std") or data.std  # the training normalization
    batch = min(args.batch_size, len(split))
    ensure_fits(per_image * batch, device, f"an eval batch of {batch} {size} images", "use a smaller --batch-size")
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = pick_amp(args.amp, device)[0]
    loader = make_loader(split, mean=mean, std=std, batch_size=args.batch_size,
                         train=False, device=device, channels_last=args.channels_last,
                         image_size=ck["image_size"])
    res = evaluate(model, loader, ck["num_classes"], amp_dtype=amp_dtype, keep_predictions=True)
    tta = None
    if args.tta:
        r = evaluate(model, loader, ck["num_classes"], amp_dtype=amp_dtype, tta=True)
        tta = {"top1": r["top1"], "top5": r["top5"], "loss": finite_or_none(r["loss"]),
               "nonfinite_outputs": r["nonfinite_outputs"]}
    bad = max(res["nonfinite_outputs"], (tta or {}).get("nonfinite_outputs", 0))
    if bad:
        print(f"warning: {path}: the model produced non-finite logits (NaN or infinity) for {bad} of "
              f"{res['n']} images; they count as wrong (damaged or diverged weights?)", file=sys.stderr)
    cm = res["confusion_matrix"]
    summary, params, macs = model_summary(model, input_shape, ck["model_name"])
    timing = dict.fromkeys(("latency_ms_batch1", "latency_ms_batch1_p90", "images_per_second",
                            "timing_batch_size", "timing_repeats"))
    if not args.no_timing:
        timing = benchmark(model, input_shape, batch_size=args.batch_size, amp_dtype=amp_dtype,
                           channels_last=args.channels_last)

    out.mkdir(parents=True, exist_ok=True)
    write_confusion_csv(cm, classes, out / "confusion_matrix.csv")
    plot_confusion_matrix(cm, classes, out / "confusion_matrix.png")
    wrong = (res["preds"] != res["targets"]).nonzero().flatten()
    wrong = wrong[res["confidence"][wrong].argsort(descending=True, stable=True)][:36]
    images = gather_images(loader, wrong.tolist(), mean, std)
    plot_misclassified(images, res["preds"][wrong].tolist(), res["targets"][wrong].tolist(),
                       res["confidence"][wrong].tolist(), classes, out / "misclassified.png")
    (out / "summary.txt").write_text(summary)
    if args.summary:
        print(summary)

    history = [h for h in ck.get("history") or [] if isinstance(h, dict)] if isinstance(ck.get("history"), list) else []
    seconds = [h["epoch_seconds"] for h in history if isinstance(h.get("epoch_seconds"), (int, float))]
    report = {
        "checkpoint": str(path), "model": ck["model_name"], "model_options": ck["model_options"],
        "dataset": dataset, "split": args.split, "n": res["n"], "epoch": ck.get("epoch"),
        "weights": "ema" if use_ema else "model",
        "top1": res["top1"], "top5": res["top5"], "loss": finite_or_none(res["loss"]),
        "nonfinite_outputs": res["nonfinite_outputs"],
        "tta": tta, "tta_top1": tta and tta["top1"], "tta_top5": tta and tta["top5"],
        **per_class_metrics(cm, classes, res["support"]), "confusion_matrix": cm.tolist(), "classes": classes,
        "params": params, "macs": macs, **timing,
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "channels_last": args.channels_last, "train_seconds": sum(seconds) if seconds else None,
    }
    write_json(report, out / "eval.json")
    print(f"{path}: {ck['model_name']} on {dataset} ({args.split}, {res['n']} images, epoch "
          f"{ck.get('epoch')}, {report['weights']} weights): top-1 {res['top1']:.2%}  "
          f"top-5 {res['top5']:.2%}  loss {res['loss']:.4f}")
    line = f"  params {human(params)}  MACs {human(macs)}"
    if timing["latency_ms_batch1"] is not None:
        line += (f"  latency b1 {timing['latency_ms_batch1']:.2f} ms (p90 "
                 f"{timing['latency_ms_batch1_p90']:.2f})  {timing['images_per_second']:,.0f} img/s "
                 f"at batch {timing['timing_batch_size']}")
    print(line + f"  [{report['device']}]")
    if tta:
        print(f"  flip-TTA: top-1 {tta['top1']:.2%}  top-5 {tta['top5']:.2%}")
    print(f"  wrote {out}/ eval.json confusion_matrix.csv confusion_matrix.png misclassified.png summary.txt")
    return report


# ----------------------------------------------------------------------------- over runs

# Keys of a run's args (and config.json) that say how or where it ran, not what it trained. Runs
# equal in everything else (model, its options, data, recipe, epochs, amp...) whose seeds differ
# are repeats of one configuration and make one group in the comparison: mean +- std over them.
RUNTIME_KEYS = ("seed", "out", "resume", "device", "workers", "data_dir", "compile", "compile_mode",
                "tensorboard", "channels_last", "deterministic", "world_size", "torch")
# config.json's keys computed from the others (mean/std of a seeded training subset vary by seed).
DERIVED_KEYS = ("mean", "std", "train_samples", "val_samples", "test_samples", "amp_dtype")
STATS = ("top1", "top5", "loss", "train_seconds")  # mean +- std per group
COLUMNS = ("run", "n", "seeds", "model", "dataset", "params", "macs", "top1", "top1_std", "top5",
           "top5_std", "loss", "loss_std", "latency_ms_batch1", "images_per_second", "epochs",
           "train_seconds", "train_seconds_std", "checkpoint")
RUN_COLUMNS = ("run", "group", "seed", "model", "dataset", "params", "macs", "top1", "top5", "loss",
               "latency_ms_batch1", "images_per_second", "epochs", "train_seconds", "checkpoint")


def run_config(ck):
    """What a checkpoint trained, with config.json's keys: its args plus the model it built."""
    if not ck.get("args"):
        return {}
    return {**ck["args"], "model_options": ck["model_options"], "num_classes": ck["num_classes"],
            "in_channels": ck["in_channels"], "image_size": ck["image_size"], "classes": ck.get("classes")}


def config_key(config):
    """The configuration without RUNTIME_KEYS and DERIVED_KEYS, as a comparable string."""
    return json.dumps({k: v for k, v in config.items() if k not in RUNTIME_KEYS + DERIVED_KEYS},
                      sort_keys=True, default=str)


def group_runs(runs):
    """Runs (dicts with "config") -> groups (lists of runs), in first-seen order. Runs with one
    config_key and pairwise different seeds make one group; a run without recorded args, or whose
    seed repeats in its bucket (best.pt and last.pt of one run), stays a group of its own."""
    buckets = {}
    for i, r in enumerate(runs):
        buckets.setdefault(config_key(r["config"]) if r["config"] else i, []).append(r)
    groups = []
    for members in buckets.values():
        seeds = [m["config"].get("seed") for m in members]
        if None not in seeds and len(set(seeds)) == len(seeds):
            groups.append(members)
        else:
            groups.extend([m] for m in members)
    first = {id(r): i for i, r in enumerate(runs)}
    return sorted(groups, key=lambda g: first[id(g[0])])


def mean_std(values):
    """(mean, sample std with ddof=1) of the values that are not None; std None below 2 values."""
    import statistics  # exact sums: the same mean whatever the order of the runs

    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def read_history(run_dir, fallback=None):
    """A run's per-epoch rows: its metrics.csv (numbers as float, empty cells None), else `fallback`
    (the checkpoint's history, which holds the same rows up to the checkpoint's epoch)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return list(fallback or [])
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()}
                for row in csv.DictReader(f)]


def group_label(labels, seeds):
    """'mnist-vgg16-lr0.1-seed{0,1,2}/best.pt' when the run dirs are NAME-seed<S>, else 'a + b'."""
    if len(labels) == 1:
        return labels[0]
    parts = [re.fullmatch(r"(.+)-seed\d+(/[^/]*)", label) for label in labels]
    if all(parts) and len({(p[1], p[2]) for p in parts}) == 1:
        return f"{parts[0][1]}-seed{{{','.join(map(str, seeds))}}}{parts[0][2]}"
    return " + ".join(labels)


def summarize_groups(runs):
    """group_runs + per-group statistics: dicts with label, runs, n, seeds, stats {key: (mean, std)}."""
    out = []
    for members in group_runs(runs):
        seeds = [m["config"].get("seed") for m in members]
        reports = [m["report"] for m in members]
        stats = {k: mean_std([r.get(k) for r in reports]) for k in
                 STATS + ("latency_ms_batch1", "images_per_second", "params", "macs")}
        label = group_label([m["label"] for m in members], seeds)
        out.append({"label": label, "short": label.removesuffix("/best.pt"), "runs": members,
                    "n": len(members), "seeds": seeds, "stats": stats})
    return out


def load_runs(reports):
    """Per evaluated checkpoint: its table label, eval report, configuration and history."""
    runs = []
    for r in reports:
        path = Path(r["checkpoint"])
        ck = load_checkpoint(path)
        runs.append({"label": path.parent.name + "/" + path.name, "report": r, "config": run_config(ck),
                     "history": read_history(path.parent, ck.get("history"))})
        del ck
    return runs


def load_run_dirs(dirs):
    """load_runs without the checkpoints, for results/ where only a run's files are kept: its
    eval.json (the report), config.json (the configuration) and metrics.csv (the history)."""
    runs = []
    for d in map(Path, dirs):
        report = json.loads((d / "eval.json").read_text())
        config = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        runs.append({"label": f"{d.name}/{Path(report.get('checkpoint') or 'best.pt').name}", "report": report,
                     "config": config, "history": read_history(d)})
    return runs


def group_curve(runs, key):
    """Over the epochs every run has `key` for: (epochs, mean, std or None, mean cumulative
    training seconds or None) lists. Training time = the cumulative sum of epoch_seconds."""
    per_run = []
    for r in runs:
        rows, total = {}, 0.0
        for h in sorted(r["history"], key=lambda h: h.get("epoch") or 0):
            total = None if total is None or h.get("epoch_seconds") is None else total + h["epoch_seconds"]
            if h.get("epoch") is not None and h.get(key) is not None:
                rows[int(h["epoch"])] = (h[key], total)
        per_run.append(rows)
    epochs = sorted(set.intersection(*(set(rows) for rows in per_run))) if per_run else []
    mean, std, secs = [], [], []
    for e in epochs:
        m, s = mean_std([rows[e][0] for rows in per_run])
        t = [rows[e][1] for rows in per_run]
        mean.append(m)
        std.append(s)
        secs.append(None if None in t else sum(t) / len(t))
    return (epochs, mean, std if len(runs) > 1 else None, secs if epochs and None not in secs else None)


def _style(i, n):
    """Colour and line style of group i of n: tab10 / tab20 colours, dashes past 20 groups."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return cmap(i % cmap.N), ("-", "--", ":", "-.")[(i // cmap.N) % 4]


def _legend_label(i, g):
    return f"{i + 1}  {g['short']}" + (f" (n={g['n']})" if g["n"] > 1 else "")


def _legend(fig, axes, groups, title):
    """One legend for all panels, right of them (outside the axes)."""
    handles = list(axes[0].get_lines())
    if handles:
        fig.legend(handles, [h.get_label() for h in handles], loc="upper left", bbox_to_anchor=(1.0, 0.98),
                   fontsize=8 if len(groups) <= 12 else 7, ncols=1 if len(groups) <= 24 else 2,
                   frameon=False, title=title, title_fontsize=8)


def plot_runs_curves(groups, path=None):
    """Test top-1 and training loss per epoch (top row) and against training time (bottom row),
    one line per group (its mean over seeds) with a ± std band where n > 1. Returns the Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 8), dpi=100)
    axes = fig.subplots(2, 2)
    curves = [{key: group_curve(g["runs"], key) for key in ("test_top1", "train_loss")} for g in groups]
    longest = max([c[k][3][-1] for c in curves for k in c if c[k][3]], default=0)
    unit, scale = (("s", 1) if longest < 120 else ("min", 60) if longest < 7200 else ("h", 3600))
    for i, (g, c) in enumerate(zip(groups, curves)):
        color, dash = _style(i, len(groups))
        for col, (key, factor) in enumerate((("test_top1", 100), ("train_loss", 1))):
            epochs, mean, std, secs = c[key]
            for row, x in enumerate((epochs, secs and [s / scale for s in secs])):
                if not x:
                    continue
                ax = axes[row, col]
                ax.plot(x, [m * factor for m in mean], color=color, linestyle=dash,
                        marker="." if len(x) <= 30 else None, label=_legend_label(i, g))
                if std:
                    ax.fill_between(x, [(m - s) * factor for m, s in zip(mean, std)],
                                    [(m + s) * factor for m, s in zip(mean, std)], color=color,
                                    alpha=0.2, linewidth=0)
    for row, xlabel in enumerate(("epoch", f"training time ({unit}, cumulative epoch_seconds)")):
        axes[row, 0].set(xlabel=xlabel, ylabel="test top-1 (%)", title=f"test top-1 vs {xlabel.split(' (')[0]}")
        axes[row, 1].set(xlabel=xlabel, ylabel="training loss", title=f"training loss vs {xlabel.split(' (')[0]}")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 1.25
    fig.tight_layout()
    _legend(fig, axes.flat, groups, "run (n: seeds; line: mean, band: ± std)")
    if path is not None:
        fig.savefig(path, bbox_inches="tight")
    return fig


TRADEOFF_AXES = (("params", "parameters"), ("macs", "MACs per image"), ("latency_ms_batch1", "latency at batch 1 (ms)"))


def plot_tradeoff(groups, path=None):
    """Final test top-1 against parameters, MACs and latency, one point per group (its mean,
    a vertical ± std bar where n > 1), each labelled with its run (its legend number past 8
    groups; labels left of the points in a panel's right half). x is logarithmic when it spans
    more than 20x. A panel without values (--no-timing) says so. Returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.8), dpi=100)
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (key, xlabel) in zip(axes, TRADEOFF_AXES):
        points = [(i, g, g["stats"][key][0], g["stats"]["top1"]) for i, g in enumerate(groups)]
        points = [(i, g, x, y, s) for i, g, x, (y, s) in points if x is not None and y is not None]
        missing = len(groups) - len(points)
        xs = sorted(p[2] for p in points)
        for i, g, x, y, s in points:
            color, _ = _style(i, len(groups))
            ax.plot([x], [100 * y], marker="o", linestyle="none", color=color, label=_legend_label(i, g))
            if s:
                ax.vlines(x, 100 * (y - s), 100 * (y + s), color=color, linewidth=1.5)
            right = len(xs) > 1 and xs.index(x) >= len(xs) / 2
            ax.annotate(g["short"] if len(groups) <= 8 else str(i + 1), (x, 100 * y),
                        xytext=(-4 if right else 4, 4), textcoords="offset points", fontsize=7,
                        ha="right" if right else "left")
        if not points:
            what = "latency not measured\n(evaluate.py --no-timing)" if key.startswith("latency") else "no values"
            ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="0.4")
        else:
            if xs[0] > 0 and xs[-1] > 20 * xs[0]:
                ax.set_xscale("log")
            ax.margins(x=0.1)
            if missing:
                ax.text(0.02, 0.02, f"{missing} run(s) without a value", transform=ax.transAxes, fontsize=7)
        ax.set(xlabel=xlabel, title=f"top-1 vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test top-1 (%)")
    fig.tight_layout()
    _legend(fig, axes, groups, "run (n: seeds; point: mean, bar: ± std)")
    if path is not None:
        fig.savefig(path, bbox_inches="tight")
    return fig


def _same(values):
    """One value when all are equal, else ';'-joined (e.g. best.pt epochs that differ)."""
    return values[0] if len(set(map(str, values))) == 1 else ";".join(map(str, values))


def comparison(reports, out_dir, runs=None):
    """Runs grouped by configuration (seeds pooled: mean +- std): comparison.csv / .md (returned),
    per-run comparison_runs.csv / .md, and the figures over runs, curves.png and tradeoff.png
    (comparison_curves.png / comparison_tradeoff.png when out_dir is a run's own folder, whose
    curves.png is train.py's). `runs`: load_runs(reports) unless given (load_run_dirs)."""
    runs = load_runs(reports) if runs is None else runs
    groups = summarize_groups(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_rows, rows = [], []
    for g in groups:
        for m in g["runs"]:
            r = m["report"]
            run_rows.append({"run": m["label"], "group": g["label"], "seed": m["config"].get("seed"),
                             "epochs": r["epoch"], **{k: r.get(k) for k in RUN_COLUMNS if k in r}})
        row = {"run": g["label"], "n": g["n"], "seeds": " ".join(str(s) for s in g["seeds"] if s is not None),
               "model": _same([m["report"]["model"] for m in g["runs"]]),
               "dataset": _same([m["report"]["dataset"] for m in g["runs"]]),
               "epochs": _same([m["report"]["epoch"] for m in g["runs"]]),
               "checkpoint": ";".join(m["report"]["checkpoint"] for m in g["runs"])}
        for k in ("params", "macs", "latency_ms_batch1", "images_per_second"):
            row[k] = g["stats"][k][0]
        for k in STATS:
            row[k], row[k + "_std"] = g["stats"][k]
        rows.append(row)
    for name, columns, data in (("comparison.csv", COLUMNS, rows), ("comparison_runs.csv", RUN_COLUMNS, run_rows)):
        with open(out_dir / name, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(data)

    def cell(r, key, f, unit=""):  # 'mean ± std unit' in a group of 2+, 'value unit' otherwise
        v, s = r.get(key), r.get(key + "_std")
        return "-" if v is None else f(v) + unit if s is None else f"{f(v)} ± {f(s)}{unit}"

    pct, num = (lambda v: f"{v:.2%}"[:-1]), (lambda v: f"{v:.4f}")
    head = ["| run | model | dataset | n | params | MACs | top-1 | top-5 | loss | latency b1 (ms) | img/s | epochs | train time |",
            "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    tables = {}
    for name, data in (("comparison.md", rows), ("comparison_runs.md", run_rows)):
        lines = list(head) if name == "comparison.md" else [head[0].replace(" n |", " seed |"), head[1]]
        for r in data:
            lines.append("| " + " | ".join([
                r["run"], str(r["model"]), str(r["dataset"]), str(r["n"] if "n" in r else r["seed"]),
                human(r["params"]), human(r["macs"]), cell(r, "top1", pct, "%"), cell(r, "top5", pct, "%"),
                cell(r, "loss", num), "-" if r["latency_ms_batch1"] is None else f"{r['latency_ms_batch1']:.2f}",
                "-" if r["images_per_second"] is None else f"{r['images_per_second']:,.0f}",
                "-" if r["epochs"] is None else str(r["epochs"]),
                cell(r, "train_seconds", lambda v: f"{v / 60:.1f}", " min")]) + " |")
        tables[name] = "\n".join(lines) + "\n"
    if any(g["n"] > 1 for g in groups):
        tables["comparison.md"] += (
            "\nn > 1: the runs differ only in --seed (also ignored: " + ", ".join(RUNTIME_KEYS[1:]) + "; "
            "and config.json's " + ", ".join(DERIVED_KEYS) + "); "
            "cells are mean ± std over them, std the sample standard deviation (ddof=1); latency and "
            "img/s are means. Per-run rows: comparison_runs.md / .csv.\n")
    for name, text in tables.items():
        (out_dir / name).write_text(text)
    own = (out_dir / "metrics.csv").exists() or out_dir.resolve() in {
        Path(r["checkpoint"]).resolve().parent for r in reports}
    prefix = "comparison_" if own else ""
    plot_runs_curves(groups, out_dir / f"{prefix}curves.png")
    plot_tradeoff(groups, out_dir / f"{prefix}tradeoff.png")
    return tables["comparison.md"], [f"{prefix}curves.png", f"{prefix}tradeoff.png"]


def get_args_parser():
    p = argparse.ArgumentParser(
        description="Evaluate deeper-networks checkpoints.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python evaluate.py runs/demo/best.pt                        # eval.json, confusion matrix, timing\n"
               "  python evaluate.py runs/demo/best.pt --tta --summary        # + flip TTA, layer table\n"
               "  python evaluate.py results/study/*/best.pt --out results/study   # + comparison, curves, trade-offs\n"
               "  python evaluate.py ckpt.pt --data-dir /other/copy --no-timing    # same classes, another folder")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--data-dir", default=None, help="default: the one recorded in the checkpoint")
    p.add_argument("--dataset", default=None, choices=sorted(DATASETS), help="default: the checkpoint's")
    p.add_argument("--download", action="store_true", help="download the dataset when missing")
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: cuda, then mps (Apple silicon), then cpu")
    p.add_argument("--batch-size", type=int_range(1), default=256, help="eval batch and throughput batch (>= 1)")
    p.add_argument("--out", default=None, help="output folder (see the module docstring)")
    p.add_argument("--tta", action="store_true", help="also report horizontal-flip TTA accuracy")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="auto: bf16 on CUDA where supported, off on CPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights when present")
    p.add_argument("--no-timing", action="store_true", help="skip latency/throughput timing")
    p.add_argument("--summary", action="store_true", help="print the model's layer table")
    return p


def main(args):
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    for path in args.checkpoints:  # fail before any long work on a typo
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint not found: {path}")
    device = pick_device(args.device)
    outs = output_dirs(args.checkpoints, args.out)
    with out_of_memory_as_error("the model or a batch is too large for this device; use a smaller "
                                "--batch-size (or --no-timing)"):
        reports = [evaluate_checkpoint(p, o, args, device) for p, o in zip(args.checkpoints, outs)]
    if len(reports) > 1:
        out_dir = Path(args.out) if args.out else Path(os.path.commonpath(
            [str(Path(p).resolve().parent) for p in args.checkpoints]))
        table, figures = comparison(reports, out_dir)
        print("\n" + table + f"wrote {out_dir}/ comparison.csv comparison.md comparison_runs.csv "
              f"comparison_runs.md {' '.join(figures)}")
    return reports


def cli(argv=None):
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
