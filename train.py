"""Train any registered model on any registered dataset.

    python train.py --model resnet18 --dataset cifar10 --epochs 30
    python train.py --model googlenet --residual --dataset cifar10 --epochs 100
    python train.py --model resnet20 --dataset synthetic --epochs 2 --out runs/demo
    python train.py --resume runs/demo/last.pt --epochs 4          # continue a run
    torchrun --nproc_per_node 2 train.py --model resnet18 --dataset cifar10   # DDP

Hyperparameters left unset come from a per-dataset recipe (RECIPES below; --help shows them).
The run dir gets config.json, metrics.csv (one row per epoch), last.pt (every epoch), best.pt
(best validation top-1; the last epoch when there is no validation split) and curves.png.
"""
import argparse
import copy
import csv
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoint
import data
import models
from evaluate import evaluate
import runtime
from runtime import pick_device

AUX_WEIGHT = 0.3  # GoogLeNet paper: auxiliary losses weighted 0.3
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
                  "test_top1", "test_top5", "epoch_seconds", "images_per_second",
                  "ema_test_top1"]
SCHEDULERS = ("cosine", "step", "multistep", "plateau", "exponential", "onecycle", "none")

# What a user gets with no hyperparameter flags. Keys left out fall back to DEFAULTS.
DEFAULTS = dict(data_dir="data", epochs=30, batch_size=128, optimizer="sgd", momentum=0.9, nesterov=True,
                weight_decay=5e-4, scheduler="cosine", augment="standard")
RECIPES = {
    "mnist": dict(epochs=10, augment="none"),
    "fashion-mnist": dict(epochs=20, augment="none"),
    "kmnist": dict(epochs=20, augment="none"),
    "svhn": dict(epochs=20, augment="none", lr=0.05),  # digits: no horizontal flips
    "cifar10": dict(epochs=30),
    "cifar100": dict(epochs=60),
    "folder": dict(epochs=30),
    "synthetic": dict(epochs=5, augment="none"),
}
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
DEFAULT_WD = {"sgd": 5e-4, "adamw": 0.05}
SWITCH = ("auto", "on", "off")


class Diverged(RuntimeError):
    """A non-finite loss: the run stops, the last good checkpoint stays."""


def threads_arg(value):
    """--threads: 'auto' or a positive integer (argparse turns the ValueError into exit 2)."""
    if value == "auto":
        return value
    n = int(value)
    if n < 1:
        raise ValueError(value)
    return n


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, and the recipe table kept as written."""


def get_args_parser():
    recipes = "\n".join(f"  {name:<14} {', '.join(f'{k}={v}' for k, v in r.items())}"
                         for name, r in RECIPES.items())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
        epilog=f"Unset hyperparameters: {', '.join(f'{k}={v}' for k, v in DEFAULTS.items())}, "
               f"lr sgd={DEFAULT_LR['sgd']} adamw={DEFAULT_LR['adamw']}, weight decay adamw="
               f"{DEFAULT_WD['adamw']}; per dataset:\n{recipes}")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=sorted(models.MODELS), help="architecture")
    g.add_argument("--dataset", choices=sorted(data.DATASETS), help="dataset")
    g.add_argument("--data-dir", default=None, help="dataset root, torchvision layout (default ./data)")
    g.add_argument("--image-size", type=int, default=None, help="resize to N px (default: native)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="convert images to C channels (default: native)")
    g.add_argument("--val-split", type=float, default=0.0,
                   help="fraction of train held out (stratified) for model selection")
    g.add_argument("--limit-train", type=int, default=None, help="stratified train subset")
    g.add_argument("--limit-test", type=int, default=None, help="stratified test subset")
    g.add_argument("--augment", choices=data.AUGMENTS, default=None,
                   help="augmentation preset (default: per-dataset recipe)")
    g.add_argument("--cutout", type=int, default=0, help="cutout square side in px (0: off)")
    g = p.add_argument_group("model options")
    g.add_argument("--plain", action="store_true", default=None, help="ResNets without shortcuts")
    g.add_argument("--residual", nargs="?", const="identity", choices=("identity", "projection"),
                   default=None, help="GoogLeNet shortcuts (no value: identity)")
    g.add_argument("--aux-logits", action="store_true", default=None,
                   help="GoogLeNet auxiliary heads (loss weight 0.3)")
    g.add_argument("--inception-kernel", type=int, choices=(3, 5), default=None,
                   help="GoogLeNet big-branch kernel (5: paper, 3: torchvision)")
    g.add_argument("--stem", choices=("auto", "cifar", "imagenet"), default=None)
    g.add_argument("--head", choices=("auto", "compact", "paper"), default=None, help="VGG head")
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--zero-init-residual", action="store_true", default=None)
    g = p.add_argument_group("optimization (unset: per-dataset recipe)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="global batch size")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (sgd 0.1, adamw 1e-3)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=None)
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weight-decay", type=float, default=None, help="sgd 5e-4, adamw 0.05")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None)
    g.add_argument("--milestones", type=int, nargs="+", default=None,
                   help="multistep epochs (default: 50%% and 75%% of --epochs)")
    g.add_argument("--gamma", type=float, default=0.1, help="step/multistep/exponential/plateau factor")
    g.add_argument("--step-size", type=int, default=30, help="step: epochs between decays")
    g.add_argument("--patience", type=int, default=5, help="plateau: epochs without improvement")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up length")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--mixup", type=float, default=0.0, help="mixup Beta alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix Beta alpha (0: off)")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of weights, e.g. 0.999 (0: off)")
    g.add_argument("--clip-grad", type=float, default=0.0, help="max grad norm (0: off)")
    g = p.add_argument_group("speed and runtime")
    g.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="autocast dtype. auto: bf16 on CUDA (fp16 on GPUs without bf16); on the CPU "
                        "bf16 where it is native (amx_bf16 or avx512_bf16), fp32 elsewhere")
    g.add_argument("--compile", nargs="?", const="on", choices=SWITCH, default="auto",
                   help="torch.compile the model (no value: on). auto: on CUDA; on the CPU only for "
                        f"runs of >= {runtime.COMPILE_MIN_STEPS_CPU} training steps, where the "
                        "compile time is repaid")
    g.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    g.add_argument("--channels-last", nargs="?", const="on", choices=SWITCH, default="auto",
                   help="NHWC memory format (no value: on). auto: on CUDA and CPU")
    g.add_argument("--threads", type=threads_arg, default=None,
                   help="CPU intra-op threads (default: torch's, the physical cores). auto: that less "
                        "the CPUs other processes keep busy at the start, at least 1 (much faster on a "
                        "shared machine, but runs started under different load do not repeat bit for bit)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--workers", type=int, default=4, help="dataloader path only")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="bit-repeatable (slower) kernels")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run dir (default runs/<dataset>-<model>-<time>)")
    g.add_argument("--resume", default=None, metavar="CKPT", help="continue from a checkpoint")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    return p


# ----------------------------------------------------------------------------- set-up helpers

MODEL_OPTIONS = ("plain", "residual", "aux_logits", "inception_kernel", "stem", "head",
                 "dropout", "zero_init_residual")
# On --resume these come from the command line; everything else from the checkpoint's args.
RUNTIME_ARGS = ("epochs", "out", "device", "workers", "compile", "compile_mode", "threads", "resume",
                "tensorboard", "data_dir")


def resolve_args(args):
    """Fill unset hyperparameters from the dataset recipe; returns a new Namespace."""
    a = argparse.Namespace(**vars(args))
    recipe = {**DEFAULTS, **RECIPES.get(a.dataset, {})}
    for k, v in recipe.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.lr is None:
        a.lr = DEFAULT_LR[a.optimizer]
    if a.optimizer == "adamw" and args.weight_decay is None:
        a.weight_decay = DEFAULT_WD["adamw"]
    if a.milestones is None:
        a.milestones = [int(a.epochs * 0.5), int(a.epochs * 0.75)]
    return a


def check_args(a):
    if a.epochs < 1 or a.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be positive")
    if not 0.0 <= a.val_split < 1.0:
        raise ValueError("--val-split must be in [0, 1)")
    if a.scheduler == "plateau" and a.val_split <= 0:
        raise ValueError("--scheduler plateau watches validation loss: give --val-split > 0 "
                         "(it never looks at the test set)")
    if a.lr <= 0:
        raise ValueError("--lr must be positive")


def model_options(a):
    return {k: getattr(a, k) for k in MODEL_OPTIONS if getattr(a, k, None) is not None}


def setup_distributed():
    """(rank, world_size, local_rank); initialises the process group under torchrun."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


# ----------------------------------------------------------------------------- optimization

def build_optimizer(model, a, device):
    # No weight decay on BatchNorm/bias parameters (1-D tensors), as in most modern recipes.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": a.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    if a.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=a.lr, momentum=a.momentum,
                               nesterov=bool(a.nesterov and a.momentum > 0), **fused)
    return torch.optim.AdamW(groups, lr=a.lr, **fused)


class Schedule:
    """Learning rate as a pure function of the iteration, stepped once per optimizer step.

    lr(it) = base_lr * warmup(it) * shape(it) * plateau_scale. Epoch-defined shapes (step,
    multistep, exponential) change at epoch boundaries; cosine and onecycle move every step.
    """

    def __init__(self, optimizer, name, epochs, iters_per_epoch, warmup_epochs=0.0,
                 milestones=(), gamma=0.1, step_size=30, patience=5):
        self.optimizer, self.name = optimizer, name
        self.ipe, self.total = iters_per_epoch, epochs * iters_per_epoch
        self.warmup = int(round(warmup_epochs * iters_per_epoch))
        self.milestones, self.gamma, self.step_size, self.patience = list(milestones), gamma, step_size, patience
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.it, self.scale, self.best, self.bad_epochs = 0, 1.0, math.inf, 0
        self._apply()

    def factor(self, it):
        f = min(1.0, (it + 1) / self.warmup) if self.warmup and it < self.warmup else 1.0
        epoch = it // self.ipe
        if self.name == "cosine":
            t, T = max(0, it - self.warmup), max(1, self.total - self.warmup)
            f *= 0.5 * (1 + math.cos(math.pi * min(t, T) / T))
        elif self.name == "step":
            f *= self.gamma ** (epoch // self.step_size)
        elif self.name == "multistep":
            f *= self.gamma ** sum(epoch >= m for m in self.milestones)
        elif self.name == "exponential":
            f *= self.gamma ** epoch
        elif self.name == "onecycle":
            # torch's OneCycleLR (pct_start 0.3, div 25, final div 1e4, cosine), per iteration.
            lo, end = 1 / 25, 1 / 25e4
            up_end, down_end = 0.3 * self.total - 1, self.total - 1
            if it <= up_end:
                start, stop, pct = lo, 1.0, it / up_end
            else:
                start, stop, pct = 1.0, end, min(1.0, (it - up_end) / (down_end - up_end))
            f *= stop + (start - stop) / 2 * (math.cos(math.pi * pct) + 1)
        return f * self.scale

    def _apply(self):
        f = self.factor(self.it)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def step(self):
        self.it += 1
        self._apply()

    def epoch_end(self, val_loss):
        """Plateau: divide by 1/gamma after `patience` epochs without validation improvement."""
        if self.name != "plateau" or val_loss is None:
            return
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.scale *= self.gamma
                self.bad_epochs = 0
                self._apply()

    def state_dict(self):
        return {"it": self.it, "scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, s):
        self.it, self.scale, self.best, self.bad_epochs = s["it"], s["scale"], s["best"], s["bad_epochs"]
        self._apply()


class EMA:
    """Exponential moving average of weights; buffers (BN statistics) are copied."""

    def __init__(self, model, decay):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


def mix_batch(x, y, a, rng):
    """Mixup or cutmix (one chosen at random per batch when both are on).

    Returns (x, y, y2, lam): loss = lam * CE(y) + (1 - lam) * CE(y2). `rng` is a numpy
    Generator seeded per epoch, so the draws are repeatable and cost no device sync.
    """
    modes = [m for m, alpha in (("mixup", a.mixup), ("cutmix", a.cutmix)) if alpha > 0]
    if not modes:
        return x, y, y, 1.0
    mode = modes[rng.integers(len(modes))]
    lam = float(rng.beta(a.mixup, a.mixup) if mode == "mixup" else rng.beta(a.cutmix, a.cutmix))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device, non_blocking=True)
    if mode == "mixup":
        return x * lam + x[perm] * (1 - lam), y, y[perm], lam
    H, W = x.shape[-2:]
    cut = math.sqrt(1 - lam)
    h, w = int(H * cut), int(W * cut)
    cy, cx = int(rng.integers(H)), int(rng.integers(W))
    y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    return x, y, y[perm], lam


def train_one_epoch(model, loader, optimizer, schedule, scaler, criterion, a, epoch, device,
                    amp_dtype, ema=None, progress=None):
    """One pass over the training loader. Returns (mean loss, accuracy, images seen).

    Loss and accuracy are accumulated on the device; the host syncs only every
    CHECK_EVERY steps to catch a non-finite loss early, and at the end.
    """
    CHECK_EVERY = 50
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen = 0
    rng = np.random.default_rng([a.seed, epoch, int(os.environ.get("RANK", 0))])
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for step, (x, y) in enumerate(loader):
        x, y, y2, lam = mix_batch(x, y, a, rng)
        with autocast:
            out = model(x)
            aux = ()
            if isinstance(out, (tuple, list)):
                out, *aux = out
            loss = lam * criterion(out, y) + (1 - lam) * criterion(out, y2) if lam < 1 else criterion(out, y)
            for o in aux:
                loss = loss + AUX_WEIGHT * criterion(o, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if a.clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), a.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        if ema is not None:
            ema.update(unwrap(model))
        n = y.shape[0]
        seen += n
        loss = loss.detach()
        loss_sum += loss.float() * n
        correct += (out.detach().argmax(1) == y).sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == len(loader):
            bad = int(first_bad)
            if bad >= 0:
                raise Diverged(f"loss became non-finite at epoch {epoch + 1}, step {bad + 1}; "
                               f"lower the learning rate (--lr {a.lr:g}) or add --clip-grad / --warmup-epochs")
        if progress is not None:
            progress.update(1)
    if dist.is_initialized():
        t = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device)])
        dist.all_reduce(t)
        loss_sum, correct, seen = t[0], t[1], int(t[2])
    return float(loss_sum) / max(seen, 1), float(correct) / max(seen, 1), seen


def unwrap(model):
    """The plain nn.Module under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------- files

def write_metrics(history, path):
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, METRIC_COLUMNS)
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    os.replace(tmp, path)


def plot_curves(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("test_loss", "test")):
        if any(r.get(key) is not None for r in history):
            ax1.plot(ep, [r.get(key) for r in history], marker=".", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "val"), ("test_top1", "test top-1")):
        if any(r.get(key) is not None for r in history):
            ax2.plot(ep, [100 * r[key] if r.get(key) is not None else None for r in history],
                     marker=".", label=label)
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_out(a):
    return os.path.join("runs", f"{a.dataset}-{a.model}-{time.strftime('%Y%m%d-%H%M%S')}")


def plain(v):
    """JSON/weights_only-safe copy of an args value."""
    return list(v) if isinstance(v, tuple) else v


# ----------------------------------------------------------------------------- main

def main(args):
    resume_ck = None
    if args.resume:
        resume_ck = checkpoint.load_checkpoint(args.resume)
        saved = dict(resume_ck.get("args") or {})
        for k in RUNTIME_ARGS:
            if getattr(args, k, None) is not None:
                saved[k] = getattr(args, k)
        saved["epochs"] = args.epochs or saved.get("epochs")
        saved["out"] = args.out or str(Path(args.resume).parent)
        args = argparse.Namespace(**{**vars(args), **saved})
    elif args.model is None or args.dataset is None:
        raise ValueError("--model and --dataset are required (or --resume CKPT)")
    a = resolve_args(args)
    check_args(a)

    rank, world, local_rank = setup_distributed()
    device = pick_device(a.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    if a.batch_size % world:
        raise ValueError(f"--batch-size {a.batch_size} must be divisible by the {world} processes")
    torch.manual_seed(a.seed)
    if a.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    writer = None
    if a.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard")

    d = data.load_data(a.dataset, a.data_dir, image_size=a.image_size, channels=a.channels,
                       val_split=a.val_split, limit_train=a.limit_train,
                       limit_test=a.limit_test, seed=a.seed)
    # Every speed choice in one call (runtime.pick_speed): auto resolves per device and run
    # length (all epochs, so that a resumed run decides as the uninterrupted one did).
    speed = runtime.pick_speed(device, amp=a.amp, compile=a.compile, channels_last=a.channels_last,
                               threads=getattr(a, "threads", None),
                               train_steps=a.epochs * max(1, len(d.train) // a.batch_size))
    amp_dtype = speed["amp"]
    torch.set_num_threads(speed["threads"])
    opts = model_options(a)
    model = models.build_model(a.model, d.num_classes, d.in_channels, d.image_size, **opts)
    if resume_ck is not None:
        model.load_state_dict(resume_ck["model"])
    mem = torch.channels_last if speed["channels_last"] else torch.contiguous_format
    model = model.to(device, memory_format=mem)

    loader_kw = dict(mean=d.mean, std=d.std, device=device, channels_last=speed["channels_last"],
                     workers=a.workers, seed=a.seed)
    train_loader = data.make_loader(d.train, batch_size=a.batch_size // world, train=True,
                                    augment=a.augment, cutout=a.cutout, rank=rank,
                                    world_size=world, **loader_kw)
    eval_bs = max(256, a.batch_size)
    val_loader = data.make_loader(d.val, batch_size=eval_bs, train=False, **loader_kw) if d.val else None
    test_loader = data.make_loader(d.test, batch_size=eval_bs, train=False, **loader_kw)

    optimizer = build_optimizer(model, a, device)
    schedule = Schedule(optimizer, a.scheduler, a.epochs, len(train_loader), a.warmup_epochs,
                        a.milestones, a.gamma, a.step_size, a.patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = EMA(model, a.ema) if a.ema > 0 else None
    criterion = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
    history, start_epoch, best_val = [], 0, -1.0
    if resume_ck is not None:
        optimizer.load_state_dict(resume_ck["optimizer"])
        schedule.load_state_dict(resume_ck["scheduler"])
        scaler.load_state_dict(resume_ck["scaler"])
        if ema is not None and resume_ck.get("ema") is not None:
            ema.module.load_state_dict(resume_ck["ema"])
        history = list(resume_ck.get("history") or [])
        start_epoch = resume_ck["epoch"]
        best_val = max([r["val_acc"] for r in history if r.get("val_acc") is not None], default=-1.0)
        torch.set_rng_state(resume_ck["rng"]["torch"])
        if device.type == "cuda" and resume_ck["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(resume_ck["rng"]["cuda"])
        if start_epoch >= a.epochs:
            raise ValueError(f"{args.resume} already finished {start_epoch} epochs; "
                             f"pass --epochs N with N > {start_epoch} to train further")

    train_model = model
    if world > 1:
        # Plain ImageNet ResNets keep (unused) projection convs for parameter parity.
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(opts.get("plain")))
    if speed["compile"]:  # compiled lazily on the first step: epoch 1's time includes compilation
        train_model = torch.compile(train_model, mode=None if a.compile_mode == "default" else a.compile_mode)

    out = Path(a.out or default_out(a))
    is_main = rank == 0
    if is_main:
        if resume_ck is None and (out / "last.pt").exists():
            raise ValueError(f"{out} already holds a run (last.pt); use --resume {out / 'last.pt'} "
                             "or another --out")
        out.mkdir(parents=True, exist_ok=True)
        config = {k: plain(v) for k, v in vars(a).items()}
        config.update(model_options=opts, num_classes=d.num_classes, in_channels=d.in_channels,
                      image_size=d.image_size, classes=d.classes, mean=list(d.mean),
                      std=list(d.std), device=str(device), world_size=world,
                      amp_dtype=str(amp_dtype), torch=torch.__version__,
                      speed={**speed, "amp": str(speed["amp"]), "eval_amp": str(speed["eval_amp"])},
                      train_samples=len(d.train), val_samples=len(d.val) if d.val else 0,
                      test_samples=len(d.test))
        (out / "config.json").write_text(json.dumps(config, indent=2))
        if a.tensorboard:
            writer = SummaryWriter(str(out / "tb"))
        print(f"{a.model} on {a.dataset}: {len(d.train)} train / {len(d.val) if d.val else 0} val / "
              f"{len(d.test)} test, {sum(p.numel() for p in model.parameters()):,} params, "
              f"device {device}, amp {amp_dtype}, world {world}, out {out}", flush=True)
        print(f"speed: {runtime.describe_speed(speed)}", flush=True)

    tty = is_main and sys.stdout.isatty()
    wall0 = time.perf_counter()
    for epoch in range(start_epoch, a.epochs):
        train_loader.set_epoch(epoch)
        progress = None
        if tty:
            from tqdm import tqdm
            progress = tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{a.epochs}", leave=False)
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc, seen = train_one_epoch(
            train_model, train_loader, optimizer, schedule, scaler, criterion, a, epoch, device,
            amp_dtype, ema, progress)
        train_seconds = time.perf_counter() - t0
        if progress is not None:
            progress.close()
        eval_amp = speed["eval_amp"]
        val = evaluate(train_model, val_loader, d.num_classes, amp_dtype=eval_amp) if val_loader else None
        test = evaluate(train_model, test_loader, d.num_classes, amp_dtype=eval_amp)
        ema_test = evaluate(ema.module, test_loader, d.num_classes, amp_dtype=eval_amp) if ema else None
        schedule.epoch_end(val["loss"] if val else None)
        row = dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val["loss"] if val else None, val_acc=val["top1"] if val else None,
                   test_loss=test["loss"], test_top1=test["top1"], test_top5=test["top5"],
                   epoch_seconds=time.perf_counter() - t0,
                   images_per_second=seen / train_seconds,
                   ema_test_top1=ema_test["top1"] if ema_test else None)
        history.append(row)
        if not is_main:
            continue
        ck = checkpoint.make_checkpoint(
            model_name=a.model, model_options=opts, num_classes=d.num_classes,
            in_channels=d.in_channels, image_size=d.image_size, classes=d.classes, mean=d.mean,
            std=d.std, args={k: plain(v) for k, v in vars(a).items()}, epoch=epoch + 1,
            model=model.state_dict(), ema=ema.module.state_dict() if ema else None,
            optimizer=optimizer.state_dict(), scheduler=schedule.state_dict(),
            scaler=scaler.state_dict(),
            rng={"torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
            history=history)
        checkpoint.save(ck, out / "last.pt")
        improved = val is not None and val["top1"] > best_val
        if improved or val is None:
            best_val = val["top1"] if val else best_val
            checkpoint.save(ck, out / "best.pt")
        write_metrics(history, out / "metrics.csv")
        if writer is not None:
            for k, v in row.items():
                if k != "epoch" and v is not None:
                    writer.add_scalar(k, v, epoch + 1)
        msg = (f"epoch {epoch + 1}/{a.epochs} lr {lr:.4g} train loss {train_loss:.4f} "
               f"acc {100 * train_acc:.2f}% | ")
        if val:
            msg += f"val loss {val['loss']:.4f} acc {100 * val['top1']:.2f}% | "
        msg += (f"test loss {test['loss']:.4f} top-1 {100 * test['top1']:.2f}% "
                f"top-5 {100 * test['top5']:.2f}% | {row['epoch_seconds']:.1f}s "
                f"{row['images_per_second']:.0f} img/s")
        if ema_test:
            msg += f" | ema top-1 {100 * ema_test['top1']:.2f}%"
        print(msg + (" *" if improved else ""), flush=True)

    if is_main and history:
        plot_curves(history, out / "curves.png")
        if writer is not None:
            writer.close()
        last = history[-1]
        best = max((r for r in history if r.get("val_acc") is not None),
                   key=lambda r: r["val_acc"], default=None)
        train_time = sum(r["epoch_seconds"] for r in history)
        ips = sum(r["images_per_second"] for r in history) / len(history)
        print(f"done: {a.model} on {a.dataset}, {last['epoch']} epochs"
              + (f", best val top-1 {100 * best['val_acc']:.2f}% (epoch {best['epoch']})" if best else "")
              + f", final test top-1 {100 * last['test_top1']:.2f}% top-5 {100 * last['test_top5']:.2f}%"
              f", train time {train_time:.1f}s (this session {time.perf_counter() - wall0:.1f}s)"
              f", {ips:.0f} img/s; checkpoints in {out}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    if args.resume is None and (args.model is None or args.dataset is None):
        parser.error("--model and --dataset are required (or --resume CKPT)")
    try:
        main(args)
    except (ValueError, OSError, Diverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
