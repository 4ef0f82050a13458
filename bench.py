"""Training speed, side by side: each speed-up alone, what `auto` picks, and the classic loop.

    python bench.py --device cpu --dataset folder --data-dir /tmp/cifar10-jpeg \
        --models resnet20 resnet56 vgg11_bn --out results/cpu/bench_train_xeon.json
    python bench.py --dataset folder --data-dir /tmp/cifar10-jpeg --out results/bench-gpu.json
    python bench.py --models resnet20 --dataset synthetic --steps 4 --warmup 1 --device cpu
    python bench.py --loader-only --dataset folder --data-dir /tmp/cifar10-jpeg   # the data pipelines alone

Configurations (--configs), each through train.py's train_one_epoch: eager (fp32), channels_last, bf16,
compile, threads (--threads auto), auto (what a run of --auto-steps picks), auto_no_compile, classic
(kuangliu/pytorch-cifar: PIL transforms in a Dataset, DataLoader workers). They take turns, --rounds times,
so that load from other jobs hits all alike. On CUDA all run with TF32 and cudnn.benchmark (rows say tf32).
"""
import argparse
import copy
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import data
import models
import runtime
import train
from runtime import device_name, number, pick_device, run_cli, synchronize

DEFAULT_MODELS = {"cpu": ("resnet20",), "cuda": ("resnet18", "resnet20", "resnet56", "vgg16_bn", "googlenet")}
DEFAULT_SIDE_MODELS = {"cpu": ("resnet56", "vgg11_bn"), "cuda": ()}
CONFIGS = ("eager", "channels_last", "bf16", "compile", "threads", "auto_no_compile", "auto", "classic")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--models", nargs="+", choices=sorted(models.MODELS), help="timed in every configuration "
      f"(default: CPU {' '.join(DEFAULT_MODELS['cpu'])}; GPU {' '.join(DEFAULT_MODELS['cuda'])})")
    a("--side-models", nargs="*", choices=sorted(models.MODELS), help="also timed, in eager and auto only "
      f"(default: CPU {' '.join(DEFAULT_SIDE_MODELS['cpu'])}; GPU none)")
    a("--dataset", choices=sorted(data.DATASETS), default="cifar10")
    a("--data-dir", default="data")
    a("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
      help="configurations to time (default: all; threads only where auto differs from torch's default)")
    a("--batch-size", type=number(int, 1), help="training batch size (CPU 128, GPU 512)")
    a("--steps", type=number(int, 1), default=30, help="timed steps per configuration, over all rounds")
    a("--rounds", type=number(int, 1), default=5, help="turns the configurations take")
    a("--warmup", type=number(int, 0), default=3, help="untimed steps first (compile included)")
    a("--auto-steps", type=number(int, 1), default=20 * (50000 // 128),  # 20 CIFAR-10 epochs at batch 128
      help="run length in steps that `auto` decides for (compile on the CPU depends on it)")
    a("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    a("--threads", type=number(int, 1), help="CPU threads of all configs but `threads` (default: torch's)")
    a("--compile-mode", default="default",
      choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    a("--classic-models", nargs="*", help="models that also get the classic loop (default: the first one)")
    a("--classic-batch-size", type=number(int, 1), default=128)
    a("--classic-workers", type=number(int, 0), default=2)
    a("--loader-only", action="store_true", help="time the data pipelines alone (tensor path vs classic)")
    a("--batches", type=number(int, 1), default=100, help="--loader-only: timed batches per pipeline")
    a("--out", help="write the JSON here")
    return p


def endless(loader, device):
    """Batches on the device, epoch after epoch (the classic loop's host batches copied as it does)."""
    for epoch in itertools.count():
        getattr(loader, "set_epoch", lambda epoch: None)(epoch)  # data.py's loader reshuffles per epoch
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def write_json(result, out):
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        runtime.write_text(out, json.dumps(result, indent=2))
    return result


class PILDataset(torch.utils.data.Dataset):
    """A uint8 split served as PIL images, the way torchvision's CIFAR10 class serves them."""

    def __init__(self, split, transform):  # H x W x C images (H x W for gray ones), as PIL takes them
        self.images, self.labels = split.images.permute(0, 2, 3, 1).squeeze(3).numpy(), split.labels
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def classic_loader(d, batch_size, workers, device):
    """kuangliu/pytorch-cifar's: PIL crop, flip, ToTensor, Normalize in a Dataset; a DataLoader's workers."""
    import torchvision.transforms as T
    transform = T.Compose([T.RandomCrop(d.image_size, padding=data.crop_padding(d.image_size)),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(d.mean, d.std)])
    return torch.utils.data.DataLoader(PILDataset(d.train, transform), batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                                       pin_memory=device.type == "cuda")


def loader_benchmark(args, device, d):
    """--loader-only: the tensor path's batches against the classic pipeline's, no training."""
    if args.batch_size > len(d.train):  # the classic loader drops the partial batch: no batch at all
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(d.train)} training images")
    tensor = data.make_loader(d.train, mean=d.mean, std=d.std, batch_size=args.batch_size, train=True,
                              augment="standard", device=device)
    speed = []
    for loader in (tensor, classic_loader(d, args.batch_size, args.classic_workers, device)):
        it = endless(loader, device)
        next(it)  # images/s after the first batch
        t0 = time.perf_counter()
        n = sum(len(next(it)[0]) for _ in range(args.batches))
        synchronize(device)
        speed.append(n / (time.perf_counter() - t0))
    fast, slow = speed
    print(f"images/s: tensor path {fast:,.0f}, Dataset + PIL + DataLoader {slow:,.0f} ({fast / slow:.1f}x)")
    result = {"dataset": args.dataset, "device": str(device), "cpu": runtime.cpu_name(),
              "cpu_flags": runtime.cpu_flags(), "torch": torch.__version__, "batch_size": args.batch_size,
              "batches": args.batches, "workers": args.classic_workers,
              "tensor_images_per_second": round(fast, 1), "dataloader_images_per_second": round(slow, 1),
              "speedup": round(fast / slow, 2), "command": "python " + " ".join(sys.argv)}
    print(json.dumps(result))
    return result


class PeakMemory:
    """CUDA memory of one configuration as if it ran alone (peak_memory_gib): what it holds (built or left
    by its steps) plus its steps' peak above what they began with; the other configurations' not counted."""

    def __init__(self, device):
        self.cuda, self.device, self.held, self.peak = device.type == "cuda", device, 0, 0

    def start(self):
        if self.cuda:
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self):
        if self.cuda:
            self.peak = max(self.peak, self.held + torch.cuda.max_memory_allocated(self.device) - self.before)
            self.held += torch.cuda.memory_allocated(self.device) - self.before


def precision(amp, device):
    """What a configuration computes in: fp32 matmuls and convolutions are tf32 on CUDA with TF32 on."""
    tf32 = amp is None and device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return "tf32" if tf32 else runtime.dtype_name(amp)


class Trainer:
    """One configuration: its own model copy, optimizer, loader and thread count."""

    def __init__(self, name, base_model, d, device, args, speed, default_threads):
        self.memory = PeakMemory(device)
        self.memory.start()  # what building it allocates is its own
        self.name, self.device, self.speed = name, device, speed
        self.threads = speed["threads"] if device.type == "cpu" else default_threads  # set in run()
        mem = torch.channels_last if speed["channels_last"] else torch.contiguous_format
        model = copy.deepcopy(base_model).to(device, memory_format=mem)
        self.net = torch.compile(model, mode=args.compile_mode) if speed["compile"] else model
        classic = name == "classic"
        self.batch = args.classic_batch_size if classic else args.batch_size
        loader = classic_loader(d, self.batch, args.classic_workers, device) if classic else data.make_loader(
            d.train, mean=d.mean, std=d.std, batch_size=self.batch, train=True, augment="standard",
            device=device, channels_last=speed["channels_last"])
        self.stream = endless(loader, device)
        self.optimizer = train.build_optimizer(model, device, lr=0.05, weight_decay=5e-4)  # SGD, nesterov
        self.schedule = train.Schedule(self.optimizer, "none", 1, 1)
        self.scaler = torch.amp.GradScaler(device.type, enabled=speed["amp"] == torch.float16)
        self.precision = precision(speed["amp"], device)
        self.what = f"PIL + DataLoader {args.classic_workers} workers, {self.precision} eager" if classic \
            else " + ".join([self.precision] + [k for k in ("channels_last", "compile") if speed[k]])
        self.wall, self.cpu, self.images, self.rounds, self.steps = 0.0, 0.0, 0, [], 0
        self.memory.stop()

    def __len__(self):  # the trainer is train_one_epoch's loader: the stream's next `steps` batches
        return self.steps

    def __iter__(self):
        return (next(self.stream) for _ in range(self.steps))

    def run(self, n, timed=True):
        """n training steps (the device done at the end) -> seconds; timed ones add to the totals."""
        torch.set_num_threads(self.threads)
        w0, c0, self.steps = time.perf_counter(), time.process_time(), n
        self.memory.start()
        _, _, seen = train.train_one_epoch(self.net, self, self.optimizer, self.schedule, self.scaler,
                                           torch.nn.CrossEntropyLoss(), epoch=0, device=self.device,
                                           amp_dtype=self.speed["amp"])
        synchronize(self.device)
        self.memory.stop()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if timed:
            self.wall, self.cpu, self.images = self.wall + wall, self.cpu + cpu, self.images + seen
            self.rounds.append(round(seen / wall, 1))
        return wall


def main(args):
    device = pick_device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    args.models = args.models or list(DEFAULT_MODELS[kind])
    side = [m for m in (DEFAULT_SIDE_MODELS[kind] if args.side_models is None else args.side_models)
            if m not in args.models]
    args.batch_size = args.batch_size or (512 if kind == "cuda" else 128)
    d = data.load_data(args.dataset, args.data_dir)
    if d.train.images is None:
        raise ValueError("bench.py needs a training split that fits in memory (the tensor path)")
    if args.loader_only:
        return write_json(loader_benchmark(args, device, d), args.out)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    default_threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(default_threads)
    off = dict(amp="off", compile="off", channels_last="off", threads=default_threads)
    table = {k: runtime.pick_speed(device, **v) for k, v in {  # runtime.pick_speed's dict per configuration
        "eager": off, "channels_last": {**off, "channels_last": "on"}, "bf16": {**off, "amp": "bf16"},
        "compile": {**off, "compile": "on"}, "threads": {**off, "threads": "auto"}, "classic": off,
        "auto": {"train_steps": args.auto_steps}, "auto_no_compile": {"compile": "off"}}.items()}
    configs = [c for c in args.configs if c != "threads"
               or device.type == "cpu" and table["threads"]["threads"] != default_threads]
    classic_models = args.models[:1] if args.classic_models is None else args.classic_models
    meta = {"device": device_name(device), "cpu": runtime.cpu_name(), "cpu_flags": runtime.cpu_flags(),
            "cpu_count": runtime.cpu_count(), "default_threads": default_threads,
            "torch": torch.__version__, "python": sys.version.split()[0], "dataset": args.dataset,
            "image_size": d.image_size, "batch_size": args.batch_size, "steps": args.steps,
            "rounds": args.rounds, "warmup": args.warmup, "auto_steps": args.auto_steps, "side_models": side,
            "auto": runtime.describe_speed(table["auto"]), "command": "python " + " ".join(sys.argv)}
    print(f"{meta['cpu'] if device.type == 'cpu' else meta['device']}; {' '.join(meta['cpu_flags'])}; "
          f"torch {meta['torch']}; auto for a {args.auto_steps}-step run: {meta['auto']}", flush=True)
    rows, loads = [], []
    for name in args.models + side:
        torch.manual_seed(0)
        base = models.build_model(name, d.num_classes, d.in_channels, d.image_size)
        macs = models.count_macs(base, (d.in_channels, d.image_size, d.image_size))
        wanted = [c for c in configs if (c != "classic" or name in classic_models)
                  and (name in args.models or c in ("eager", "auto"))]
        trainers = [Trainer(c, base, d, device, args, table[c], default_threads) for c in wanted]
        for t in trainers:
            t.warmup_seconds = t.run(max(2, args.warmup // 4) if t.name == "classic" else args.warmup, False)
            print(f"{name} {t.name}: warm-up {t.warmup_seconds:.1f}s", flush=True)
        for r in range(args.rounds):
            for t in (trainers if r % 2 == 0 else trainers[::-1]):
                t.run(-(-args.steps // args.rounds))
            loads.append([round(v, 2) for v in os.getloadavg()])
            print(f"{name} round {r + 1}/{args.rounds}: load {loads[-1][0]}, "
                  + ", ".join(f"{t.name} {t.rounds[-1]:,.0f}" for t in trainers), flush=True)
        eager = next((t for t in trainers if t.name == "eager"), None)
        for t in trainers:
            ips, on_cpu, gib = t.images / t.wall, device.type == "cpu", t.memory.peak / 2**30
            layout = "channels_last" if t.speed["channels_last"] else "NCHW"
            rows.append(dict(model=name, config=t.name, what=t.what, precision=t.precision, layout=layout,
                             threads=t.threads, batch_size=t.batch, images_per_second=round(ips, 1),
                             gflops=round(ips * 6 * macs / 1e9, 1),
                             vs_eager=round(ips * eager.wall / eager.images, 2) if eager else None,
                             images_per_cpu_second=round(t.images / t.cpu, 1) if on_cpu else None,
                             round_images_per_second=t.rounds, warmup_seconds=round(t.warmup_seconds, 2),
                             forward_macs=macs, peak_memory_gib=round(gib, 3) if kind == "cuda" else None))
        del trainers, base
        torch._dynamo.reset()  # the next model starts with empty compile caches
    print("\n| model | config | what | images/s | vs eager |\n|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r['what']} | {r['images_per_second']:,.0f} | "
              f"{'-' if r['vs_eager'] is None else r['vs_eager']} |")
    return write_json({**meta, "load_average_per_round": loads, "load_average_1min_range": [
        min(v[0] for v in loads), max(v[0] for v in loads)], "rows": rows}, args.out)


def cli(argv=None):
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
