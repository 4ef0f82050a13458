"""Training speed, side by side: this project's fast path against the classic CIFAR loop.

    python bench.py                                   # GPU: resnet18/20/56, vgg16_bn, googlenet
    python bench.py --dataset folder --data-dir /tmp/cifar10-jpeg --out results/bench.json
    python bench.py --models resnet20 --dataset synthetic --steps 5 --warmup 2 --device cpu

For every model: the fast path (tensor data path, bf16 autocast on CUDA, channels_last,
torch.compile; train.py's own train_one_epoch) runs `--warmup` steps (compilation included,
reported apart as warmup_seconds), then `--steps` timed steps -> steady-state images/s, and
peak GPU memory. Then, in the same process, the classic baseline the way
kuangliu/pytorch-cifar trains: torchvision Dataset + PIL RandomCrop/Flip + DataLoader(batch 128,
2 workers) + fp32 eager. Prints a table, writes JSON (--out). It is a separate script because
it drives train.py, data.py and models.py together and fits none of them alone.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import data
import models
import train
from runtime import device_name, pick_amp, pick_device

DEFAULT_MODELS = ("resnet18", "resnet20", "resnet56", "vgg16_bn", "googlenet")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(models.MODELS), default=list(DEFAULT_MODELS))
    p.add_argument("--dataset", choices=sorted(data.DATASETS), default="cifar10")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--batch-size", type=int, default=512, help="fast path batch size")
    p.add_argument("--steps", type=int, default=100, help="timed steps")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (compile included)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the classic loop (resnet18, or the first model)")
    p.add_argument("--baseline-batch-size", type=int, default=128)
    p.add_argument("--baseline-workers", type=int, default=2)
    p.add_argument("--out", default=None, help="write the JSON here")
    return p


class Steps:
    """Exactly n batches from a loader, cycling over epochs (train_one_epoch needs len())."""

    def __init__(self, loader, n):
        self.loader, self.n, self.epoch = loader, n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        k = 0
        while True:
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(self.epoch)
            self.epoch += 1
            for batch in self.loader:
                if k == self.n:
                    return
                yield batch
                k += 1


class ToDevice:
    """Host batches from a DataLoader, copied to the device the way the classic loop does."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(model, loader, device, amp_dtype, a, warmup, steps):
    """(warm-up seconds, steady-state images/s) through train.py's own training step."""
    hp = argparse.Namespace(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                            optimizer="sgd", seed=0, mixup=0.0, cutmix=0.0, clip_grad=0.0)
    optimizer = train.build_optimizer(model, hp, device)
    schedule = train.Schedule(optimizer, "none", 1, 1)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()
    run = lambda n: train.train_one_epoch(model, Steps(loader, n), optimizer, schedule, scaler,
                                          criterion, hp, 0, device, amp_dtype)
    t0 = time.perf_counter()
    run(warmup)
    sync(device)
    t1 = time.perf_counter()
    _, _, seen = run(steps)  # ends with a host read of the loss: the device is done
    sync(device)
    return t1 - t0, seen / (time.perf_counter() - t1)


def main(args):
    device = pick_device(args.device)
    amp_dtype = pick_amp(args.amp, device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    d = data.load_data(args.dataset, args.data_dir)
    meta = {"device": device_name(device),
            "torch": torch.__version__, "python": platform.python_version(), "dataset": args.dataset,
            "image_size": d.image_size, "command": "python " + " ".join(sys.argv)}
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = models.build_model(name, d.num_classes, d.in_channels, d.image_size)
        mem = torch.channels_last if args.channels_last else torch.contiguous_format
        model = model.to(device, memory_format=mem)
        loader = data.make_loader(d.train, mean=d.mean, std=d.std, batch_size=args.batch_size,
                                  train=True, augment="standard", device=device,
                                  channels_last=args.channels_last)
        net = model
        if args.compile:
            net = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm_s, ips = time_training(net, loader, device, amp_dtype, args, args.warmup, args.steps)
        rows.append({"model": name, "pipeline": "fast", "batch_size": args.batch_size,
                     "amp": str(amp_dtype), "channels_last": args.channels_last,
                     "compile": args.compile_mode if args.compile else None,
                     "warmup_seconds": round(warm_s, 2), "images_per_second": round(ips, 1),
                     "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                     if device.type == "cuda" else None})
        print(f"{name}: {ips:,.0f} images/s (warm-up incl. compile {warm_s:.1f}s)", flush=True)
        del net, model, loader
    if args.baseline:
        name = "resnet18" if "resnet18" in args.models else args.models[0]
        torch.manual_seed(0)
        model = models.build_model(name, d.num_classes, d.in_channels, d.image_size).to(device)
        loader = data.classic_loader(d.train, mean=d.mean, std=d.std,
                                     batch_size=args.baseline_batch_size,
                                     workers=args.baseline_workers, device=device)
        warm_s, ips = time_training(model, ToDevice(loader, device), device, None, args,
                                    max(2, args.warmup // 4), args.steps)
        rows.append({"model": name, "pipeline": f"classic (PIL + DataLoader {args.baseline_workers} workers, fp32 eager)",
                     "batch_size": args.baseline_batch_size, "amp": None, "channels_last": False,
                     "compile": None, "warmup_seconds": round(warm_s, 2),
                     "images_per_second": round(ips, 1), "peak_memory_gib": None})
        fast = next(r for r in rows if r["model"] == name and r["pipeline"] == "fast")
        meta["speedup_vs_classic"] = round(fast["images_per_second"] / rows[-1]["images_per_second"], 2)
    print(f"\n{meta['device']}, torch {meta['torch']}, {args.dataset} {d.image_size}px, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps")
    print("| model | pipeline | batch | images/s | warm-up s | peak GiB |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['pipeline']} | {r['batch_size']} | {r['images_per_second']:,.0f} | "
              f"{r['warmup_seconds']} | {r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-'} |")
    if "speedup_vs_classic" in meta:
        print(f"fast path / classic loop: {meta['speedup_vs_classic']}x")
    result = {**meta, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
