"""Train any registered model on any registered dataset.

    python train.py --model resnet18 --dataset cifar10 --epochs 30
    python train.py --model googlenet --residual --dataset cifar10 --epochs 100
    python train.py --model resnet20 --dataset synthetic --epochs 2 --out runs/demo
    python train.py --resume runs/demo/last.pt --epochs 4          # continue a run
    python train.py --model resnet18 --pretrained --dataset folder --data-dir DIR --image-size 224 \
        --backbone-lr-scale 0.1 --lr 0.01 --epochs 10                  # fine-tune ImageNet weights
    torchrun --nproc_per_node 2 train.py --model resnet18 --dataset cifar10   # DDP

Hyperparameters left unset come from a per-dataset recipe (RECIPES below; --help shows them).
The run dir gets config.json, metrics.csv (one row per epoch), last.pt (every epoch), best.pt
(best validation top-1; the last epoch when there is no validation split) and curves.png.

Why one file of ~1,000 lines (over the ~650 this repo aims for): the command line is most of it,
every flag with its range check, the per-dataset recipes and the resume rules (a resume names
each flag it does not apply), and it reads best beside the run it configures. The run itself is
the short chain at the bottom: settings -> setup_runtime -> build_run -> open_run_dir ->
run_epoch / save_epoch per epoch -> finish; the checkpoint format and the run dir's lock live in
checkpoint.py, device/AMP/compile choices in runtime.py.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import importlib
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


# Flags with a fixed default. The parser's own default for every flag is None, so that "given on
# the command line" is "not None" (a resume names the flags it does not apply); resolve_args()
# fills these in, and --help shows them.
FLAG_DEFAULTS = dict(val_split=0.0, cutout=0, gamma=0.1, step_size=30, patience=5, warmup_epochs=0.0,
                     label_smoothing=0.0, mixup=0.0, cutmix=0.0, ema=0.0, clip_grad=0.0, amp="auto",
                     compile="auto", compile_mode="default", channels_last="auto", device="auto",
                     workers=4, seed=0, deterministic=False, tensorboard=False)


class Diverged(RuntimeError):
    """A non-finite loss or model: the run stops, the last good checkpoint stays."""


class Interrupted(Exception):
    """Ctrl-C during a run (exit 130); the message says how to resume."""


def threads_arg(value):
    """--threads: 'auto' or a positive integer (argparse turns the ValueError into exit 2)."""
    if value == "auto":
        return value
    n = int(value)
    if n < 1:
        raise ValueError(value)
    return n


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help (from FLAG_DEFAULTS; none shown for recipe-dependent flags), and the
    recipe table kept as written."""

    def _get_help_string(self, action):
        if action.default is None:
            if action.dest in FLAG_DEFAULTS and action.help is not argparse.SUPPRESS:
                return f"{action.help or ''} (default: {FLAG_DEFAULTS[action.dest]})".strip()
            return action.help
        return super()._get_help_string(action)


def number(kind, lo, hi=None, *, lo_open=False, hi_open=False, what=""):
    """An argparse type: a finite int/float in the given range, else exit 2 with a usage line
    naming the flag and the range ("argument --ema: must be in [0, 1), got 2")."""
    if hi is None:
        allowed = f"{'>' if lo_open else '>='} {lo}"
    else:
        allowed = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    allowed += f" ({what})" if what else ""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'} {allowed}, got {text!r}") from None
        if (not math.isfinite(v) or v < lo or (lo_open and v == lo)
                or (hi is not None and (v > hi or (hi_open and v == hi)))):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


MODEL_FAMILIES = ("LeNet: lenet5 | AlexNet: alexnet | NiN: nin | VGG: vgg11 vgg13 vgg16 vgg19 (+ _bn) | "
                  "GoogLeNet: googlenet | ResNet: resnet18 34 50 101 152 | CIFAR ResNet: resnet20 32 44 56 110 1202")


def get_args_parser():
    recipes = "\n".join(f"  {name:<14} {', '.join(f'{k}={v}' for k, v in r.items())}"
                         for name, r in RECIPES.items())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
        epilog=f"Unset hyperparameters: {', '.join(f'{k}={v}' for k, v in DEFAULTS.items())}, "
               f"lr sgd={DEFAULT_LR['sgd']} adamw={DEFAULT_LR['adamw']}, weight decay adamw="
               f"{DEFAULT_WD['adamw']}; per dataset:\n{recipes}")
    count, positive = number(int, 1), number(float, 0, lo_open=True)
    fraction = number(float, 0, 1, hi_open=True)  # [0, 1)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=sorted(models.MODELS), metavar="NAME", help=MODEL_FAMILIES)
    g.add_argument("--dataset", choices=sorted(data.DATASETS), help="dataset")
    g.add_argument("--data-dir", help="dataset root, torchvision layout (default: ./data)")
    g.add_argument("--image-size", type=count, help="resize to N px (default: native)")
    g.add_argument("--channels", type=int, choices=(1, 3), help="convert images to C channels (default: native)")
    g.add_argument("--val-split", type=fraction,
                   help="fraction of train held out (stratified) for model selection")
    g.add_argument("--limit-train", type=count, help="stratified train subset")
    g.add_argument("--limit-test", type=count, help="stratified test subset")
    g.add_argument("--augment", choices=data.AUGMENTS, help="augmentation preset (default: per-dataset recipe)")
    g.add_argument("--cutout", type=number(int, 0), help="cutout square side in px (0: off)")
    g = p.add_argument_group("model options")
    g.add_argument("--plain", action="store_true", default=None, help="ResNets without shortcuts")
    g.add_argument("--residual", nargs="?", const="identity", choices=("identity", "projection"),
                   help="GoogLeNet shortcuts (no value: identity)")
    g.add_argument("--aux-logits", action="store_true", default=None,
                   help="GoogLeNet auxiliary heads (loss weight 0.3)")
    g.add_argument("--inception-kernel", type=int, choices=(3, 5),
                   help="GoogLeNet big-branch kernel (5: paper, 3: torchvision)")
    g.add_argument("--stem", choices=("auto", "cifar", "imagenet"))
    g.add_argument("--head", choices=("auto", "compact", "paper"), help="VGG head")
    g.add_argument("--dropout", type=fraction)
    g.add_argument("--zero-init-residual", action="store_true", default=None)
    g = p.add_argument_group("transfer learning (README: fine-tune an ImageNet model)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--pretrained", nargs="?", const="DEFAULT", default=None, metavar="WEIGHTS",
                   help="start from torchvision's ImageNet weights via the torch hub cache (no value: "
                        "DEFAULT; or a name such as IMAGENET1K_V1); their mean/std are used")
    x.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from one of our checkpoints or a state_dict file (torchvision layout "
                        "included); what does not fit (head, shape mismatches) is skipped and named")
    g.add_argument("--freeze-backbone", action="store_true",
                   help="train only the new head: backbone weights and BatchNorm statistics stay fixed")
    g.add_argument("--backbone-lr-scale", type=positive_float, default=None, metavar="F",
                   help="the backbone's learning rate is F x --lr (e.g. 0.1); the head's is --lr")
    g = p.add_argument_group("optimization (unset: per-dataset recipe)")
    g.add_argument("--epochs", type=count)
    g.add_argument("--batch-size", type=count, help="global batch size")
    g.add_argument("--lr", type=positive, help="peak learning rate (sgd 0.1, adamw 1e-3)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"))
    g.add_argument("--momentum", type=fraction)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    g.add_argument("--weight-decay", type=number(float, 0), help="sgd 5e-4, adamw 0.05")
    g.add_argument("--scheduler", choices=SCHEDULERS)
    g.add_argument("--milestones", type=count, nargs="+",
                   help="multistep epochs (default: 50%% and 75%% of --epochs)")
    g.add_argument("--gamma", type=number(float, 0, 1, lo_open=True,
                                          what="the multiplier of the lr at each decay; 1 keeps it"),
                   help="step/multistep/exponential/plateau factor")
    g.add_argument("--step-size", type=count, help="step: epochs between decays")
    g.add_argument("--patience", type=number(int, 0), help="plateau: epochs without improvement")
    g.add_argument("--warmup-epochs", type=number(float, 0), help="linear warm-up length")
    g.add_argument("--label-smoothing", type=fraction)
    g.add_argument("--mixup", type=number(float, 0), help="mixup Beta alpha (0: off)")
    g.add_argument("--cutmix", type=number(float, 0), help="cutmix Beta alpha (0: off)")
    g.add_argument("--ema", type=fraction, help="EMA decay of weights, e.g. 0.999 (0: off)")
    g.add_argument("--clip-grad", type=number(float, 0), help="max grad norm (0: off)")
    g = p.add_argument_group("speed and runtime")
    g.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast dtype. auto: bf16 on CUDA (fp16 on GPUs without bf16); on the CPU "
                        "bf16 where it is native (amx_bf16 or avx512_bf16), fp32 elsewhere")
    g.add_argument("--compile", nargs="?", const="on", choices=SWITCH,
                   help="torch.compile the model (no value: on). auto: on CUDA; on the CPU only for "
                        f"runs of >= {runtime.COMPILE_MIN_STEPS_CPU} training steps, where the "
                        "compile time is repaid")
    g.add_argument("--compile-mode",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    g.add_argument("--channels-last", nargs="?", const="on", choices=SWITCH,
                   help="NHWC memory format (no value: on). auto: on CUDA and CPU")
    g.add_argument("--threads", type=threads_arg,
                   help="CPU intra-op threads (default: torch's, the physical cores). auto: that less "
                        "the CPUs other processes keep busy at the start, at least 1 (much faster on a "
                        "shared machine, but runs started under different load do not repeat bit for bit)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="auto: cuda, then mps (Apple silicon), then cpu")
    g.add_argument("--workers", type=number(int, 0), help="dataloader path only")
    g.add_argument("--seed", type=number(int, 0, 2**32 - 1))
    g.add_argument("--deterministic", action="store_true", default=None, help="bit-repeatable (slower) kernels")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run dir (default: runs/<dataset>-<model>-<time>)")
    g.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint")
    g.add_argument("--tensorboard", action="store_true", default=None, help="also write TensorBoard events")
    return p


# ----------------------------------------------------------------------------- set-up helpers

MODEL_OPTIONS = ("plain", "residual", "aux_logits", "inception_kernel", "stem", "head",
                 "dropout", "zero_init_residual")
# What a resume may change. Given on the command line they apply; unset, epochs and data_dir come
# from the checkpoint, out is the checkpoint's folder, the rest take their defaults. Every other
# setting comes from the checkpoint's args (a resume continues the same run).
RUNTIME_ARGS = ("epochs", "out", "device", "workers", "compile", "compile_mode", "threads", "resume",
                "tensorboard", "data_dir")
# Without these a checkpoint holds weights only: it cannot continue a run.
RESUME_KEYS = ("args", "epoch", "optimizer", "scheduler", "scaler", "rng", "history")


def resolve_args(args):
    """Fill unset flags from FLAG_DEFAULTS and the dataset recipe; returns a new Namespace."""
    a = argparse.Namespace(**vars(args))
    recipe = {**FLAG_DEFAULTS, **DEFAULTS, **RECIPES.get(a.dataset, {})}
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
    """What argparse's ranges cannot say alone (and the ranges again, for callers of main())."""
    if a.epochs < 1 or a.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be positive")
    if not 0.0 <= a.val_split < 1.0:
        raise ValueError("--val-split must be in [0, 1)")
    if a.scheduler == "plateau" and a.val_split <= 0:
        raise ValueError("--scheduler plateau watches validation loss: give --val-split > 0 "
                         "(it never looks at the test set)")
    if not a.lr > 0 or not math.isfinite(a.lr):
        raise ValueError("--lr must be a finite number > 0")


def resume_args(args, ck):
    """The settings of a resumed run: the checkpoint's, except the RUNTIME_ARGS given now.
    Returns (Namespace, ignored): ignored names each flag given on the command line, other than
    RUNTIME_ARGS, whose value differs from the checkpoint's (a resume does not apply it)."""
    saved = dict(ck["args"])
    merged = {**vars(args), **saved}
    for k in RUNTIME_ARGS:
        merged[k] = getattr(args, k, None)
    merged["epochs"] = args.epochs or saved.get("epochs")
    merged["data_dir"] = args.data_dir or saved.get("data_dir")
    merged["out"] = args.out or str(Path(args.resume).parent)
    ignored = [f"{flag_text(k, v)} (checkpoint: {'unset' if saved[k] is None else saved[k]})"
               for k, v in vars(args).items()
               if v is not None and k not in RUNTIME_ARGS and k in saved and plain(v) != saved[k]]
    return argparse.Namespace(**merged), ignored


def flag_text(dest, v):
    """'--lr 0.5', '--plain', '--no-nesterov', '--milestones 3 6': a value as typed on the command line."""
    flag = "--" + dest.replace("_", "-")
    if isinstance(v, bool):
        return flag if v else f"--no-{flag[2:]}"
    return f"{flag} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"


def model_options(a):
    return {k: getattr(a, k) for k in MODEL_OPTIONS if getattr(a, k, None) is not None}


def positive_float(text):
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a positive number (got {text!r})")
    return v


def check_transfer_args(a):
    """The transfer-learning flags fit together and the weights exist, before any data is read."""
    if (a.freeze_backbone or a.backbone_lr_scale) and not (a.pretrained or a.init_from):
        raise ValueError("--freeze-backbone and --backbone-lr-scale need --pretrained or --init-from")
    if a.freeze_backbone and a.backbone_lr_scale:
        raise ValueError("--backbone-lr-scale has no effect with --freeze-backbone (the backbone is fixed)")
    if a.pretrained:
        models.pretrained_weights(a.model, a.pretrained)
        models.pretrained_options(a.model, model_options(a))


TRANSFER_WARN_SIZE = 64  # README, "Fine-tune an ImageNet model": below this, warn and suggest the weights' size


def init_weights(model, a, d, resume_ck, verbose):
    """--pretrained / --init-from (not on --resume: the checkpoint holds the weights) and
    --freeze-backbone. Returns (d, init): the data with the normalization the weights were trained
    with, and the record of where they came from (the checkpoint's "init")."""
    init = resume_ck.get("init") if resume_ck is not None else None
    if resume_ck is None and (a.pretrained or a.init_from):
        if a.pretrained:
            state, init = models.torchvision_weights(a.model, a.pretrained, d.image_size)
        else:
            state, init = checkpoint.load_init(a.init_from)
        line = models.load_transfer(model, state, new_head=bool(a.pretrained))
        if verbose:
            print(f"init from {init.get('weights') or init['source']}: {line}", flush=True)
            if a.pretrained and d.image_size < TRANSFER_WARN_SIZE:
                print(f"warning: {init['weights']} was trained on {init['image_size']} px images; at "
                      f"{d.image_size} px the network's last stages see maps of 1-2 px: for better "
                      f"transfer pass --image-size {init['image_size']} (README: fine-tune)", file=sys.stderr)
    if init and init.get("mean") and init.get("std"):
        d = dataclasses.replace(d, mean=tuple(models.for_channels(init["mean"], d.in_channels)),
                                std=tuple(models.for_channels(init["std"], d.in_channels)))
    if a.freeze_backbone:
        trainable = models.freeze_backbone(model)
        if verbose:
            print(f"frozen backbone: training {', '.join(trainable)} only", flush=True)
    return d, init


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

def build_optimizer(model, device, *, optimizer="sgd", lr, weight_decay, momentum=0.9, nesterov=True,
                    backbone_lr_scale=None):
    """SGD or AdamW over the trainable parameters; the optimizer's default lr is the peak `lr`.

    No weight decay on BatchNorm/bias parameters (1-D tensors), as in most modern recipes.
    Frozen parameters (--freeze-backbone) stay out; --backbone-lr-scale F: the head's groups
    first at --lr, then the backbone's at F x --lr (Schedule scales every group alike)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    parts = [(params, lr)]
    if backbone_lr_scale and backbone_lr_scale != 1:
        heads = tuple(h + "." for h in models.head_names(model))
        parts = [([(n, p) for n, p in params if n.startswith(heads)], lr),
                 ([(n, p) for n, p in params if not n.startswith(heads)], lr * backbone_lr_scale)]
    groups = [g for part, group_lr in parts for g in (
        {"params": [p for _, p in part if p.ndim > 1], "weight_decay": weight_decay, "lr": group_lr},
        {"params": [p for _, p in part if p.ndim <= 1], "weight_decay": 0.0, "lr": group_lr}) if g["params"]]
    fused = {"fused": True} if device.type == "cuda" else {}
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum,
                               nesterov=bool(nesterov and momentum > 0), **fused)
    return torch.optim.AdamW(groups, lr=lr, **fused)


def optimizer_options(a):
    """build_optimizer's keyword arguments from the run's settings."""
    return dict(optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay, momentum=a.momentum,
                nesterov=a.nesterov, backbone_lr_scale=getattr(a, "backbone_lr_scale", None))


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
        """ema = decay * ema + (1 - decay) * weights: torch.optim.swa_utils' EMA rule (tested
        against it), with public tensor ops."""
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


def mix_batch(x, y, mixup, cutmix, rng):
    """Mixup or cutmix (one chosen at random per batch when both are on).

    Returns (x, y, y2, lam): loss = lam * CE(y) + (1 - lam) * CE(y2). `rng` is a numpy
    Generator seeded per epoch, so the draws are repeatable and cost no device sync.
    """
    modes = [m for m, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0]
    if not modes:
        return x, y, y, 1.0
    mode = modes[rng.integers(len(modes))]
    lam = float(rng.beta(mixup, mixup) if mode == "mixup" else rng.beta(cutmix, cutmix))
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


def train_one_epoch(model, loader, optimizer, schedule, scaler, criterion, *, epoch, device,
                    amp_dtype=None, mixup=0.0, cutmix=0.0, clip_grad=0.0, seed=0, rank=0, ema=None,
                    progress=None):
    """One pass over the training loader. Returns (mean loss, accuracy, images seen).

    mixup / cutmix: Beta alphas (0: off); clip_grad: max gradient norm (0: off); the mixing draws
    come from a generator seeded by (seed, epoch, rank), so each DDP rank mixes differently.

    Loss and accuracy are accumulated on the device; the host syncs only every CHECK_EVERY
    steps and after the last one, to catch a non-finite loss or model early: the check after
    the last step sees the epoch's final update, so a checkpoint never holds it unchecked.
    """
    CHECK_EVERY = 50
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen = 0
    rng = np.random.default_rng([seed, epoch, rank])
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for step, (x, y) in enumerate(loader):
        x, y, y2, lam = mix_batch(x, y, mixup, cutmix, rng)
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
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
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
            model_bad = (~finite(unwrap(model), ema)).to(device, torch.long)
            bad_step, bad_model = any_rank(torch.stack([first_bad, model_bad]))
            if bad_step >= 0:
                raise Diverged(f"loss became non-finite at epoch {epoch + 1}, step {bad_step + 1}; "
                               f"{DIVERGED_HINT.format(lr=optimizer.defaults['lr'])}")
            if bad_model:
                raise Diverged(f"the model's weights or BatchNorm statistics became non-finite at epoch "
                               f"{epoch + 1} (by step {step + 1}; the loss was still finite); "
                               f"{DIVERGED_HINT.format(lr=optimizer.defaults['lr'])}")
        if progress is not None:
            progress.update(1)
    if dist.is_initialized():
        t = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device)])
        dist.all_reduce(t)
        loss_sum, correct, seen = t[0], t[1], int(t[2])
    return float(loss_sum) / max(seen, 1), float(correct) / max(seen, 1), seen


DIVERGED_HINT = "lower the learning rate (--lr {lr:g}) or add --clip-grad / --warmup-epochs"


def finite(model, ema=None):
    """A 0-dim bool on the device: every floating parameter and buffer (BatchNorm statistics
    included) of the model and of its EMA is finite. One fused pass (the max-abs norm over all
    tensors is finite exactly when every element is) and no host sync."""
    tensors = [t.detach() for m in (model, ema.module if ema is not None else None) if m is not None
               for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(nn.utils.get_total_norm(tensors, math.inf))


def any_rank(flags):
    """flags (a small long tensor) reduced by max over the DDP ranks, read on the host: all ranks
    stop together (one rank raising alone would leave the others waiting forever)."""
    flags = flags.long()
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


def unwrap(model):
    """The plain nn.Module under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------- files

def write_metrics(history, path):
    with runtime.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, METRIC_COLUMNS)
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})


def plot_curves(history, path, title=""):
    """Loss and accuracy per epoch (integer epoch ticks), titled with model, dataset and run."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from matplotlib.ticker import MaxNLocator
    ep = [r["epoch"] for r in history]
    fig = Figure(figsize=(11, 4.3))
    ax1, ax2 = fig.subplots(1, 2)
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with runtime.replacing(path) as tmp:
        fig.savefig(tmp, dpi=110)


def default_out(a):
    return os.path.join("runs", f"{a.dataset}-{a.model}-{time.strftime('%Y%m%d-%H%M%S')}")


def plain(v):
    """JSON/weights_only-safe copy of an args value."""
    return list(v) if isinstance(v, tuple) else v


def one_line(text):
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- checks

def check_resumable(ck, path):
    missing = [k for k in RESUME_KEYS if ck.get(k) is None]
    if ck.get("rng") is not None and "torch" not in ck["rng"]:
        missing.append("rng['torch']")
    if missing:
        raise checkpoint.CheckpointError(
            f"{path} is a weights-only checkpoint (no {', '.join(missing)}): use it with evaluate.py "
            "or export.py (or to initialise a new run), not with --resume")


def check_resume_data(ck, d, path, data_dir):
    """The data a run resumes on must be the data it was trained on (its --data-dir may move)."""
    for key, have in (("num_classes", d.num_classes), ("in_channels", d.in_channels),
                      ("image_size", d.image_size)):
        if ck[key] != have:
            raise checkpoint.CheckpointError(
                f"cannot resume {path} on {data_dir}: the checkpoint has {key} {ck[key]}, the data {have}")
    if ck.get("classes") is not None and list(ck["classes"]) != list(d.classes):
        show = lambda c: ", ".join(map(str, c[:8])) + (", ..." if len(c) > 8 else "")
        raise checkpoint.CheckpointError(
            f"cannot resume {path} on {data_dir}: its classes differ (checkpoint: {show(list(ck['classes']))}; "
            f"data: {show(list(d.classes))})")


def restore_state(ck, path, optimizer, schedule, scaler, ema, device):
    """Load the rest of a resume checkpoint's state; a damaged part is one CheckpointError line."""
    part = "optimizer"
    try:
        optimizer.load_state_dict(ck["optimizer"])
        part = "scheduler"
        schedule.load_state_dict(ck["scheduler"])
        part = "scaler"
        scaler.load_state_dict(ck["scaler"])
        part = "ema"
        if ema is not None and ck.get("ema") is not None:
            ema.module.load_state_dict(ck["ema"])
        part = "rng"
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda" and ck["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise checkpoint.CheckpointError(f"cannot resume {path}: its {part} state does not fit this "
                                         f"run ({type(e).__name__}: {one_line(e)[:200]})") from None


def interrupted(epoch, out, resume=None):
    """The line Ctrl-C prints: where the run stopped and the command that continues it."""
    last = out / "last.pt" if out is not None else None
    if last is not None and last.exists():
        return f"interrupted at epoch {epoch}; resume with: python train.py --resume {last}"
    if resume and out is not None:
        return f"interrupted at epoch {epoch}; resume with: python train.py --resume {resume} --out {out}"
    return f"interrupted at epoch {epoch}, before the first checkpoint: nothing to resume"


# ----------------------------------------------------------------------------- the steps of a run

@dataclasses.dataclass
class Run:
    """Everything one run trains with, built by build_run()."""
    a: argparse.Namespace
    d: data.Data
    device: torch.device
    speed: dict
    rank: int
    world: int
    opts: dict
    init: dict | None
    model: nn.Module  # the plain module: what checkpoints and the EMA hold
    train_model: nn.Module  # the same under DDP / torch.compile: what trains and evaluates
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    ema: EMA | None
    criterion: nn.Module
    loaders: dict
    history: list
    start_epoch: int
    best_val: float

    @property
    def is_main(self):
        return self.rank == 0


def settings(args):
    """(a, resume_ck): the run's settings, every unset flag filled in, checked; on --resume the
    checkpoint's settings with the runtime flags given now (a warning names each flag ignored)."""
    resume_ck = None
    if args.resume:
        resume_ck = checkpoint.load_checkpoint(args.resume)
        check_resumable(resume_ck, args.resume)
        args, ignored = resume_args(args, resume_ck)
        if ignored and int(os.environ.get("RANK", 0)) == 0:
            print(f"warning: a resume keeps the run's settings; ignored: {', '.join(ignored)} (a resume "
                  f"may change only {', '.join(flag_text(k, True) for k in RUNTIME_ARGS if k != 'resume')})",
                  file=sys.stderr, flush=True)
    elif args.model is None or args.dataset is None:
        raise ValueError("--model and --dataset are required (or --resume CKPT)")
    a = resolve_args(args)
    check_args(a)
    check_transfer_args(a)
    if a.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return a, resume_ck


def setup_runtime(a):
    """(rank, world, device): the process group under torchrun, the device, the seed, and the
    kernels' determinism (TF32 rounds matmul/conv inputs to 10 mantissa bits: off under
    --deterministic)."""
    rank, world, local_rank = setup_distributed()
    device = pick_device(a.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    if a.batch_size % world:
        raise ValueError(f"--batch-size {a.batch_size} must be divisible by the {world} processes")
    torch.manual_seed(a.seed)
    if a.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not a.deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not a.deterministic
    return rank, world, device


def choose_speed(a, device, d):
    """Every speed choice in one call (runtime.pick_speed): auto resolves per device and run
    length (all epochs, so that a resumed run decides as the uninterrupted one did)."""
    switch = {True: "on", False: "off", None: "auto"}  # checkpoints before auto|on|off held booleans
    speed = runtime.pick_speed(device, amp=a.amp, compile=switch.get(a.compile, a.compile),
                               channels_last=switch.get(a.channels_last, a.channels_last),
                               threads=getattr(a, "threads", None),
                               train_steps=a.epochs * max(1, len(d.train) // a.batch_size))
    torch.set_num_threads(speed["threads"])
    return speed


def build_run(a, d, device, rank, world, resume_ck):
    """The model (initialised, or restored from the checkpoint resumed), loaders, optimizer,
    schedule, scaler, EMA and loss of a run, and where it starts."""
    speed = choose_speed(a, device, d)
    if resume_ck is not None:
        check_resume_data(resume_ck, d, a.resume, a.data_dir)
    opts = model_options(a)
    if a.pretrained:  # torchvision's layout: ImageNet stem, VGG's paper head, GoogLeNet's 3x3 kernel
        opts = models.pretrained_options(a.model, opts)
    model = models.build_model(a.model, d.num_classes, d.in_channels, d.image_size, **opts)
    d, init = init_weights(model, a, d, resume_ck, verbose=rank == 0)
    loader_kw = dict(mean=d.mean, std=d.std, device=device, channels_last=speed["channels_last"],
                     workers=a.workers, seed=a.seed)
    eval_bs = max(256, a.batch_size)
    loaders = {"train": data.make_loader(d.train, batch_size=a.batch_size // world, train=True,
                                         augment=a.augment, cutout=a.cutout, rank=rank,
                                         world_size=world, **loader_kw),
               "val": data.make_loader(d.val, batch_size=eval_bs, train=False, **loader_kw) if d.val else None,
               "test": data.make_loader(d.test, batch_size=eval_bs, train=False, **loader_kw)}
    if resume_ck is not None:
        checkpoint.load_weights(model, resume_ck["model"], a.model, f"cannot resume {a.resume}: its weights")
    model = model.to(device, memory_format=torch.channels_last if speed["channels_last"] else torch.contiguous_format)
    optimizer = build_optimizer(model, device, **optimizer_options(a))
    schedule = Schedule(optimizer, a.scheduler, a.epochs, len(loaders["train"]), a.warmup_epochs,
                        a.milestones, a.gamma, a.step_size, a.patience)
    scaler = torch.amp.GradScaler(device.type, enabled=speed["amp"] == torch.float16)
    ema = EMA(model, a.ema) if a.ema > 0 else None
    history, start_epoch, best_val = [], 0, -1.0
    if resume_ck is not None:
        restore_state(resume_ck, a.resume, optimizer, schedule, scaler, ema, device)
        history, start_epoch = list(resume_ck["history"]), resume_ck["epoch"]
        best_val = max([r["val_acc"] for r in history if r.get("val_acc") is not None], default=-1.0)
    train_model = model
    if world > 1:  # plain ImageNet ResNets keep (unused) projection convs for parameter parity
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(opts.get("plain")))
    if speed["compile"]:  # compiled lazily on the first step: epoch 1's time includes compilation
        train_model = torch.compile(train_model, mode=None if a.compile_mode == "default" else a.compile_mode)
    return Run(a=a, d=d, device=device, speed=speed, rank=rank, world=world, opts=opts, init=init,
               model=model, train_model=train_model, optimizer=optimizer, schedule=schedule, scaler=scaler,
               ema=ema, criterion=nn.CrossEntropyLoss(label_smoothing=a.label_smoothing), loaders=loaders,
               history=history, start_epoch=start_epoch, best_val=best_val)


def check_not_finished(run):
    if run.start_epoch >= run.a.epochs:
        raise ValueError(f"{run.a.resume} already finished {run.start_epoch} epochs; "
                         f"pass --epochs N with N > {run.start_epoch} to train further")


def open_run_dir(run, out, resume_ck):
    """Lock the run dir (returns the lock), refuse one that holds another run, repair best.pt on a
    resume, write config.json and print the run's header."""
    a, d = run.a, run.d
    out.mkdir(parents=True, exist_ok=True)
    lock = checkpoint.lock_run_dir(out)  # held until the run ends: one train.py per run dir
    try:
        checkpoint.claim_run_dir(out, a.resume)
        if resume_ck is not None:
            checkpoint.repair_best(out, resume_ck, a.resume)
        check_not_finished(run)
        config = {k: plain(v) for k, v in vars(a).items()}
        config.update(model_options=run.opts, num_classes=d.num_classes, in_channels=d.in_channels,
                      image_size=d.image_size, classes=d.classes, mean=list(d.mean), std=list(d.std),
                      init=run.init, device=str(run.device), world_size=run.world,
                      amp_dtype=str(run.speed["amp"]), torch=torch.__version__,
                      speed={**run.speed, "amp": str(run.speed["amp"]), "eval_amp": str(run.speed["eval_amp"])},
                      train_samples=len(d.train), val_samples=len(d.val) if d.val else 0,
                      test_samples=len(d.test))
        with runtime.replacing(out / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2))
    except BaseException:
        lock.close()
        raise
    print(f"{a.model} on {a.dataset}: {len(d.train)} train / {len(d.val) if d.val else 0} val / "
          f"{len(d.test)} test, {sum(p.numel() for p in run.model.parameters()):,} params, "
          f"device {run.device}, amp {run.speed['amp']}, world {run.world}, out {out}", flush=True)
    print(f"speed: {runtime.describe_speed(run.speed)}", flush=True)
    return lock


def run_epoch(run, epoch, progress=None):
    """Train one epoch, then evaluate: the epoch's metrics row and its validation result.
    Raises Diverged unless the loss, every tensor of the model and its EMA after the last step,
    and the evaluation losses are finite: what save_epoch() writes is exactly what was checked."""
    a, d, loaders, eval_amp = run.a, run.d, run.loaders, run.speed["eval_amp"]
    loaders["train"].set_epoch(epoch)
    t0 = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    train_loss, train_acc, seen = train_one_epoch(
        run.train_model, loaders["train"], run.optimizer, run.schedule, run.scaler, run.criterion,
        epoch=epoch, device=run.device, amp_dtype=run.speed["amp"], mixup=a.mixup, cutmix=a.cutmix,
        clip_grad=a.clip_grad, seed=a.seed, rank=run.rank, ema=run.ema, progress=progress)
    train_seconds = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    val = evaluate(run.train_model, loaders["val"], d.num_classes, amp_dtype=eval_amp) if loaders["val"] else None
    test = evaluate(run.train_model, loaders["test"], d.num_classes, amp_dtype=eval_amp)
    ema_test = evaluate(run.ema.module, loaders["test"], d.num_classes, amp_dtype=eval_amp) if run.ema else None
    bad = [f"{name} loss {r['loss']}" for name, r in (("validation", val), ("test", test), ("EMA test", ema_test))
           if r is not None and not math.isfinite(r["loss"])]
    if bad:  # finite weights whose eval-mode outputs are not (e.g. huge BatchNorm statistics)
        raise Diverged(f"the model's outputs became non-finite at epoch {epoch + 1} ({', '.join(bad)}); "
                       f"{DIVERGED_HINT.format(lr=a.lr)}")
    run.schedule.epoch_end(val["loss"] if val else None)
    row = dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=train_acc,
               val_loss=val["loss"] if val else None, val_acc=val["top1"] if val else None,
               test_loss=test["loss"], test_top1=test["top1"], test_top5=test["top5"],
               epoch_seconds=time.perf_counter() - t0, images_per_second=seen / train_seconds,
               ema_test_top1=ema_test["top1"] if ema_test else None)
    run.history.append(row)
    return row, val


def save_epoch(run, out, val, writer=None):
    """last.pt, then best.pt as a second name for the same file when this epoch is the best (one
    write: a kill in between leaves best.pt an epoch behind, and the resume repairs it),
    metrics.csv and TensorBoard. Returns whether validation top-1 improved."""
    a, d, row = run.a, run.d, run.history[-1]
    ck = checkpoint.make_checkpoint(
        model_name=a.model, model_options=run.opts, num_classes=d.num_classes, in_channels=d.in_channels,
        image_size=d.image_size, classes=d.classes, mean=d.mean, std=d.std,
        args={k: plain(v) for k, v in vars(a).items()}, epoch=row["epoch"], model=run.model.state_dict(),
        ema=run.ema.module.state_dict() if run.ema else None, optimizer=run.optimizer.state_dict(),
        scheduler=run.schedule.state_dict(), scaler=run.scaler.state_dict(),
        rng={"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else []},
        history=run.history, init=run.init)
    checkpoint.save(ck, out / "last.pt")
    improved = val is not None and val["top1"] > run.best_val
    if improved or val is None:
        run.best_val = val["top1"] if val else run.best_val
        checkpoint.link(out / "last.pt", out / "best.pt")
    write_metrics(run.history, out / "metrics.csv")
    if writer is not None:
        for k, v in row.items():
            if k != "epoch" and v is not None:
                writer.add_scalar(k, v, row["epoch"])
    return improved


def epoch_line(row, epochs):
    msg = (f"epoch {row['epoch']}/{epochs} lr {row['lr']:.4g} train loss {row['train_loss']:.4f} "
           f"acc {100 * row['train_acc']:.2f}% | ")
    if row["val_loss"] is not None:
        msg += f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}% | "
    msg += (f"test loss {row['test_loss']:.4f} top-1 {100 * row['test_top1']:.2f}% "
            f"top-5 {100 * row['test_top5']:.2f}% | {row['epoch_seconds']:.1f}s "
            f"{row['images_per_second']:.0f} img/s")
    if row["ema_test_top1"] is not None:
        msg += f" | ema top-1 {100 * row['ema_test_top1']:.2f}%"
    return msg


def finish(run, out, session_seconds):
    """curves.png and the closing summary line."""
    a, history = run.a, run.history
    plot_curves(history, out / "curves.png", f"{a.model} on {a.dataset}, run {out.name}")
    last = history[-1]
    best = max((r for r in history if r.get("val_acc") is not None), key=lambda r: r["val_acc"], default=None)
    train_time = sum(r["epoch_seconds"] for r in history)
    ips = sum(r["images_per_second"] for r in history) / len(history)
    print(f"done: {a.model} on {a.dataset}, {last['epoch']} epochs"
          + (f", best val top-1 {100 * best['val_acc']:.2f}% (epoch {best['epoch']})" if best else "")
          + f", final test top-1 {100 * last['test_top1']:.2f}% top-5 {100 * last['test_top5']:.2f}%"
          f", train time {train_time:.1f}s (this session {session_seconds:.1f}s)"
          f", {ips:.0f} img/s; checkpoints in {out}", flush=True)


def main(args):
    """One training run. Errors a user can act on are raised with one-line messages (ValueError,
    checkpoint.CheckpointError, OSError, Diverged), Ctrl-C as Interrupted; cli() prints them."""
    a, resume_ck = settings(args)
    rank, world, device = setup_runtime(a)
    d = data.load_data(a.dataset, a.data_dir, image_size=a.image_size, channels=a.channels,
                       val_split=a.val_split, limit_train=a.limit_train, limit_test=a.limit_test, seed=a.seed)
    run = build_run(a, d, device, rank, world, resume_ck)
    out = Path(a.out or default_out(a))
    lock, writer, epoch = None, None, run.start_epoch
    try:
        if run.is_main:
            lock = open_run_dir(run, out, resume_ck)
            resume_ck = None  # its state lives in the run now
            if a.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(str(out / "tb"))
        else:
            check_not_finished(run)
        wall0 = time.perf_counter()
        for epoch in range(run.start_epoch, a.epochs):
            progress = None
            if run.is_main and sys.stdout.isatty():
                from tqdm import tqdm
                progress = tqdm(total=len(run.loaders["train"]), desc=f"epoch {epoch + 1}/{a.epochs}", leave=False)
            row, val = run_epoch(run, epoch, progress)
            if run.is_main:
                improved = save_epoch(run, out, val, writer)
                print(epoch_line(row, a.epochs) + (" *" if improved else ""), flush=True)
        if run.is_main and run.history:
            finish(run, out, time.perf_counter() - wall0)
    except KeyboardInterrupt:
        raise Interrupted(interrupted(epoch + 1, out if run.is_main else None, a.resume)) from None
    finally:
        if writer is not None:
            writer.close()
        if lock is not None:
            lock.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def cli(argv=None):
    """The command line: returns the exit status (0; 1 with one `error:` line; 130 on Ctrl-C;
    argparse exits 2 itself on bad usage)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.resume is None and (args.model is None or args.dataset is None):
        parser.error("--model and --dataset are required (or --resume CKPT)")
    try:
        main(args)
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the run dir was touched
        print("interrupted before training started; nothing was written"
              + (f" (resume with: python train.py --resume {args.resume})" if args.resume else ""),
              file=sys.stderr)
        return 130
    except (ValueError, OSError, Diverged) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
            raise  # a bug, not a user's mistake: keep its traceback
        print("error: out of memory: lower --batch-size (or --image-size, --limit-train)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
