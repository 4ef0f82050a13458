"""Training speed, side by side: each speed-up alone, what `auto` picks, and the classic loop.

    python bench.py --device cpu --dataset folder --data-dir /tmp/cifar10-jpeg \
        --models resnet20 resnet56 vgg11_bn --out results/cpu/bench_train_xeon.json
    python bench.py --dataset folder --data-dir /tmp/cifar10-jpeg --out results/bench-gpu.json
    python bench.py --models resnet20 --dataset synthetic --steps 4 --warmup 1 --device cpu
    python bench.py --loader-only --dataset folder --data-dir /tmp/cifar10-jpeg   # the data pipelines alone

Every configuration trains through train.py's own train_one_epoch on the tensor data path:
  eager          fp32, contiguous, not compiled, torch's default thread count
  channels_last  eager + NHWC                     bf16     eager + bf16 autocast
  compile        eager + torch.compile            threads  eager + the `--threads auto` count (CPU)
  auto           what train.py's auto flags pick for a run of --auto-steps steps (a 20-epoch
                 CIFAR-10 run by default): runtime.pick_speed
  auto_no_compile  the same without torch.compile (what auto picks for shorter runs)
  classic        the classic CIFAR loop (kuangliu/pytorch-cifar): torchvision Dataset + PIL
                 RandomCrop/Flip + DataLoader(batch 128, 2 workers) + fp32 eager
Each configuration first runs --warmup untimed steps (compilation included: warmup_seconds), then
the timed steps in --rounds rounds that take turns (the order reversed every other round), so that
load from other jobs on the machine hits all configurations alike; the load average is recorded
with every round. Reported: steady-state images/s, the ratio to eager, achieved GFLOP/s (training
~ 3 x forward MACs x 2 FLOPs), images per CPU-second of this process (its CPU time, all threads:
on a shared machine a measure of the work that does not depend on the share it got; the classic
loop's workers are other processes and not counted) and peak GPU memory. Prints a table, writes
JSON (--out). A separate script because it drives train.py, data.py and models.py together.
"""
import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import data
import models
import runtime
import train
from runtime import device_name, int_range, pick_device, run_cli

DEFAULT_MODELS = {"cpu": ("resnet20",), "cuda": ("resnet18", "resnet20", "resnet56", "vgg16_bn", "googlenet")}
DEFAULT_SIDE_MODELS = {"cpu": ("resnet56", "vgg11_bn"), "cuda": ()}
DEFAULT_BATCH = {"cpu": 128, "cuda": 512}
CONFIGS = ("eager", "channels_last", "bf16", "compile", "threads", "auto_no_compile", "auto", "classic")
# A 20-epoch CIFAR-10 run at batch 128: 20 x 390 steps (the target run).
AUTO_STEPS = 20 * (50000 // 128)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--models", nargs="+", choices=sorted(models.MODELS), default=None,
                   help=f"timed in every configuration (default: CPU {' '.join(DEFAULT_MODELS['cpu'])}; "
                        f"GPU {' '.join(DEFAULT_MODELS['cuda'])})")
    p.add_argument("--side-models", nargs="*", choices=sorted(models.MODELS), default=None,
                   help="also timed, in eager and auto only: the same check on other networks "
                        f"(default: CPU {' '.join(DEFAULT_SIDE_MODELS['cpu'])}; GPU none)")
    p.add_argument("--dataset", choices=sorted(data.DATASETS), default="cifar10")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                   help="configurations to time (default: all; threads only where auto differs "
                        "from torch's default)")
    p.add_argument("--batch-size", type=int_range(1), default=None, help="training batch size (CPU 128, GPU 512)")
    p.add_argument("--steps", type=int_range(1), default=30, help="timed steps per configuration, over all rounds")
    p.add_argument("--rounds", type=int_range(1), default=5, help="turns the configurations take")
    p.add_argument("--warmup", type=int_range(0), default=3, help="untimed steps first (compile included)")
    p.add_argument("--auto-steps", type=int_range(1), default=AUTO_STEPS,
                   help="run length in steps that `auto` decides for (compile on the CPU depends on it)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--threads", type=int_range(1), default=None,
                   help="CPU intra-op threads of every configuration but `threads` (default: torch's)")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    p.add_argument("--classic-models", nargs="*", default=None,
                   help="models that also get the classic loop (default: the first one)")
    p.add_argument("--classic-batch-size", type=int_range(1), default=128)
    p.add_argument("--classic-workers", type=int_range(0), default=2)
    p.add_argument("--loader-only", action="store_true",
                   help="time the data pipelines alone: the tensor path against the classic one, no training")
    p.add_argument("--batches", type=int_range(1), default=100, help="--loader-only: timed batches per pipeline")
    p.add_argument("--out", default=None, help="write the JSON here")
    return p


class Steps:
    """The next n batches of an endless batch stream (train_one_epoch needs len())."""

    def __init__(self, stream, n):
        self.stream, self.n = stream, n

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield next(self.stream)


def endless(loader, device):
    """Batches from a loader, epoch after epoch, on the device (the classic loop's host batches
    are copied the way it does)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def sync(device):
    runtime.synchronize(device)


# ----------------------------------------------------------------------------- the classic pipeline

class PILDataset(torch.utils.data.Dataset):
    """A uint8 split served as PIL images, the way torchvision's CIFAR10 class serves them."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.tolist(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        img = self.images[i]
        img = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        return self.transform(img), self.labels[i]


def classic_loader(split, *, mean, std, batch_size=128, workers=2, device="cpu"):
    """The classic pipeline (kuangliu/pytorch-cifar): PIL RandomCrop + flip + ToTensor + Normalize
    in a torchvision-style Dataset, shuffled by a DataLoader with workers (host tensors out)."""
    import torchvision.transforms as T
    if split.images is None:
        raise ValueError("the classic pipeline needs a split that fits in memory")
    size = split.images.shape[-1]
    return torch.utils.data.DataLoader(
        PILDataset(split.images, split.labels, T.Compose([
            T.RandomCrop(size, padding=data.crop_padding(size)), T.RandomHorizontalFlip(),
            T.ToTensor(), T.Normalize(mean, std)])),
        batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0)


def loader_images_per_second(loader, batches, device):
    """Steady-state images/s of a loader alone: the first batch (worker start-up, warm-up) is
    not timed."""
    it = endless(loader, device)
    next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        n += len(x)
    sync(device)
    return n / (time.perf_counter() - t0)


def loader_benchmark(args, device):
    """--loader-only: the tensor path's batches against the classic pipeline's, no training."""
    d = data.load_data(args.dataset, args.data_dir)
    if d.train.images is None:
        raise ValueError("the loader benchmark needs a split that fits in memory")
    if args.batch_size > len(d.train):  # the classic loader drops the partial batch: no batch at all
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(d.train)} training images")
    tensor = data.make_loader(d.train, mean=d.mean, std=d.std, batch_size=args.batch_size, train=True,
                              augment="standard", device=device)
    classic = classic_loader(d.train, mean=d.mean, std=d.std, batch_size=args.batch_size,
                             workers=args.classic_workers, device=device)
    ips_tensor = loader_images_per_second(tensor, args.batches, device)
    ips_classic = loader_images_per_second(classic, args.batches, device)
    rows = [(f"tensor path (uint8 on {device.type}, batched augmentation)", ips_tensor),
            (f"Dataset + PIL transforms + DataLoader({args.classic_workers} workers)", ips_classic)]
    print(f"{args.dataset}: {len(d.train)} train images {d.in_channels}x{d.image_size}x{d.image_size}, "
          f"batch {args.batch_size}, {args.batches} batches, standard augmentation, torch {torch.__version__}")
    print(f"| {'pipeline':<58} | {'images/s':>10} |\n|{'-' * 60}|{'-' * 12}|")
    for name, v in rows:
        print(f"| {name:<58} | {v:>10,.0f} |")
    print(f"| {'speed-up':<58} | {ips_tensor / ips_classic:>9.1f}x |")
    result = {"dataset": args.dataset, "device": str(device), "cpu": runtime.cpu_name(),
              "cpu_flags": runtime.cpu_flags(), "torch": torch.__version__, "batch_size": args.batch_size,
              "batches": args.batches, "workers": args.classic_workers,
              "tensor_images_per_second": round(ips_tensor, 1),
              "dataloader_images_per_second": round(ips_classic, 1),
              "speedup": round(ips_tensor / ips_classic, 2), "command": "python " + " ".join(sys.argv)}
    print(json.dumps(result))
    write_json(result, args.out)
    return result


def write_json(result, out):
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- training speed

class Trainer:
    """One configuration: its own model copy, optimizer, loader and thread count."""

    def __init__(self, name, base_model, d, device, args, speed, default_threads):
        self.name, self.device, self.speed = name, device, speed
        self.threads = speed["threads"] if device.type == "cpu" else default_threads
        torch.set_num_threads(self.threads)
        mem = torch.channels_last if speed["channels_last"] else torch.contiguous_format
        self.model = copy.deepcopy(base_model).to(device, memory_format=mem)
        if name == "classic":
            self.batch_size = args.classic_batch_size
            loader = classic_loader(d.train, mean=d.mean, std=d.std, batch_size=self.batch_size,
                                         workers=args.classic_workers, device=device)
        else:
            self.batch_size = args.batch_size
            loader = data.make_loader(d.train, mean=d.mean, std=d.std, batch_size=self.batch_size,
                                      train=True, augment="standard", device=device,
                                      channels_last=speed["channels_last"])
        self.stream = endless(loader, device)
        self.net = self.model
        if speed["compile"]:
            self.net = torch.compile(self.model, mode=None if args.compile_mode == "default" else args.compile_mode)
        self.optimizer = train.build_optimizer(self.model, device, optimizer="sgd", lr=0.05, momentum=0.9,
                                               nesterov=True, weight_decay=5e-4)
        self.schedule = train.Schedule(self.optimizer, "none", 1, 1)
        self.scaler = torch.amp.GradScaler(device.type, enabled=speed["amp"] == torch.float16)
        self.criterion = nn.CrossEntropyLoss()
        self.wall, self.cpu, self.images, self.rounds = 0.0, 0.0, 0, []

    def run(self, n):
        """n training steps -> images; ends with a host read of the loss (the device is done)."""
        torch.set_num_threads(self.threads)
        _, _, seen = train.train_one_epoch(self.net, Steps(self.stream, n), self.optimizer, self.schedule,
                                           self.scaler, self.criterion, epoch=0, device=self.device,
                                           amp_dtype=self.speed["amp"])
        sync(self.device)
        return seen

    def warm_up(self, n):
        t0 = time.perf_counter()
        self.run(n)
        self.warmup_seconds = time.perf_counter() - t0

    def timed(self, n):
        w0, c0 = time.perf_counter(), time.process_time()
        seen = self.run(n)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        self.wall, self.cpu, self.images = self.wall + wall, self.cpu + cpu, self.images + seen
        self.rounds.append(round(seen / wall, 1))


def speeds(device, args, default_threads):
    """The speed dict (runtime.pick_speed's shape) of every configuration."""
    off = dict(amp="off", compile="off", channels_last="off", threads=default_threads)
    auto = runtime.pick_speed(device, train_steps=args.auto_steps)
    auto_no_compile = runtime.pick_speed(device, compile="off")
    table = {"eager": off, "channels_last": {**off, "channels_last": "on"}, "bf16": {**off, "amp": "bf16"},
             "compile": {**off, "compile": "on"}, "threads": {**off, "threads": "auto"},
             "classic": off}
    out = {k: runtime.pick_speed(device, **v) for k, v in table.items()}
    out["auto"], out["auto_no_compile"] = auto, auto_no_compile
    return out


def describe(speed):
    amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[speed["amp"]]
    parts = [amp] + ["channels_last"] * speed["channels_last"] + ["compile"] * speed["compile"]
    return " + ".join(parts)


def main(args):
    device = pick_device(args.device)
    args = argparse.Namespace(**vars(args))
    kind = "cuda" if device.type == "cuda" else "cpu"
    args.models = args.models or list(DEFAULT_MODELS[kind])
    side = [m for m in (DEFAULT_SIDE_MODELS[kind] if args.side_models is None else args.side_models)
            if m not in args.models]
    args.batch_size = args.batch_size or DEFAULT_BATCH["cuda" if device.type == "cuda" else "cpu"]
    # the parser's ranges again, for callers of main() with a Namespace of their own
    for what, v in (("--steps", args.steps), ("--rounds", args.rounds), ("--batch-size", args.batch_size),
                    ("--batches", args.batches), ("--threads", args.threads or 1)):
        if v < 1:
            raise ValueError(f"{what} must be positive")
    if args.loader_only:
        return loader_benchmark(args, device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    default_threads = torch.get_num_threads()
    d = data.load_data(args.dataset, args.data_dir)
    if d.train.images is None:
        raise ValueError("bench.py needs a training split that fits in memory (the tensor path)")
    table = speeds(device, args, default_threads)
    configs = [c for c in args.configs
               if not (c == "threads" and (device.type != "cpu" or table["threads"]["threads"] == default_threads))]
    classic_models = args.models[:1] if args.classic_models is None else args.classic_models
    meta = {"device": device_name(device), "cpu": runtime.cpu_name(), "cpu_flags": runtime.cpu_flags(),
            "cpu_count": runtime.cpu_count(), "default_threads": default_threads,
            "torch": torch.__version__, "python": platform.python_version(), "dataset": args.dataset,
            "image_size": d.image_size, "batch_size": args.batch_size, "steps": args.steps,
            "rounds": args.rounds, "warmup": args.warmup, "auto_steps": args.auto_steps,
            "side_models": side, "auto": runtime.describe_speed(table["auto"]), "command": "python " + " ".join(sys.argv)}
    print(f"{meta['cpu'] if device.type == 'cpu' else meta['device']}; {' '.join(meta['cpu_flags'])}; "
          f"torch {meta['torch']}; auto for a {args.auto_steps}-step run: {meta['auto']}", flush=True)
    per_round = -(-args.steps // args.rounds)
    rows, loads = [], []
    for name in args.models + side:
        torch.manual_seed(0)
        base = models.build_model(name, d.num_classes, d.in_channels, d.image_size)
        macs = models.count_macs(base, (d.in_channels, d.image_size, d.image_size))
        wanted = [c for c in configs if (c != "classic" or name in classic_models)
                  and (name in args.models or c in ("eager", "auto"))]
        trainers = [Trainer(c, base, d, device, args, table[c], default_threads) for c in wanted]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for t in trainers:
            t.warm_up(max(2, args.warmup // 4) if t.name == "classic" else args.warmup)
            print(f"{name} {t.name}: warm-up {t.warmup_seconds:.1f}s", flush=True)
        for r in range(args.rounds):
            for t in (trainers if r % 2 == 0 else trainers[::-1]):
                t.timed(per_round)
            loads.append([round(v, 2) for v in os.getloadavg()])
            print(f"{name} round {r + 1}/{args.rounds}: load {loads[-1][0]}, "
                  + ", ".join(f"{t.name} {t.rounds[-1]:,.0f}" for t in trainers), flush=True)
        eager = next((t for t in trainers if t.name == "eager"), None)
        for t in trainers:
            ips = t.images / t.wall
            rows.append({"model": name, "config": t.name,
                         "what": ("PIL + DataLoader " f"{args.classic_workers} workers, fp32 eager"
                                  if t.name == "classic" else describe(t.speed)),
                         "threads": t.threads, "batch_size": t.batch_size,
                         "images_per_second": round(ips, 1),
                         "vs_eager": round(ips * eager.wall / eager.images, 2) if eager else None,
                         "gflops": round(ips * 6 * macs / 1e9, 1),
                         "images_per_cpu_second": round(t.images / t.cpu, 1) if device.type == "cpu" else None,
                         "round_images_per_second": t.rounds,
                         "warmup_seconds": round(t.warmup_seconds, 2), "forward_macs": macs,
                         "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                         if device.type == "cuda" else None})
        del trainers, base
        torch._dynamo.reset()  # the next model starts with empty compile caches
    meta["load_average_per_round"] = loads
    meta["load_average_1min_range"] = [min(v[0] for v in loads), max(v[0] for v in loads)]
    print(f"\n{meta['cpu'] if device.type == 'cpu' else meta['device']} ({meta['cpu_count']} CPUs; "
          f"{' '.join(meta['cpu_flags']) or '-'}), torch {meta['torch']}, {args.dataset} {d.image_size}px, "
          f"{args.steps} timed steps per configuration in {args.rounds} rounds after {args.warmup} warm-up "
          f"steps, load average {meta['load_average_1min_range'][0]}-{meta['load_average_1min_range'][1]}")
    print("| model | config | what | threads | batch | images/s | vs eager | GFLOP/s | images/CPU-s | warm-up s |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r['what']} | {r['threads']} | {r['batch_size']} | "
              f"{r['images_per_second']:,.0f} | {r['vs_eager'] if r['vs_eager'] is not None else '-'} | "
              f"{r['gflops']} | {r['images_per_cpu_second'] or '-'} | {r['warmup_seconds']} |")
    result = {**meta, "rows": rows}
    write_json(result, args.out)
    return result


def cli(argv=None):
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
