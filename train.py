"""Train any registered model on any registered dataset.

    python train.py --model resnet18 --dataset cifar10 --epochs 30
    python train.py --model googlenet --residual --dataset cifar10 --epochs 100
    python train.py --resume runs/demo/last.pt --epochs 4          # continue a run
    python train.py --model resnet18 --pretrained --dataset folder --data-dir DIR --image-size 224 \
        --backbone-lr-scale 0.1 --lr 0.01 --epochs 10                  # fine-tune ImageNet weights
    torchrun --nproc_per_node 2 train.py --model resnet18 --dataset cifar10   # DDP

Defaults: DEFAULTS, then the optimizer's and the dataset's recipe (--help lists them); the
checkpoint stores the resolved settings, a resume is those plus RESUMABLE flags. The run dir gets
config.json, metrics.csv, last.pt, best.pt and curves.png (docs/training.md).
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import runtime  # first: a Ctrl-C while torch imports exits 130 quietly
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoint
import compare
import data
import models
from evaluate import evaluate
from runtime import number

AUX_WEIGHT = 0.3  # GoogLeNet paper: auxiliary losses weighted 0.3
SWITCH = ("auto", "on", "off")
# Every flag's default, in one place; a recipe below overrides some of them.
DEFAULTS = dict(data_dir="data", epochs=30, batch_size=128, optimizer="sgd", momentum=0.9, nesterov=True,
                scheduler="cosine", gamma=0.1, step_size=30, patience=5, warmup_epochs=0.0,
                augment="standard", cutout=0, val_split=0.0, label_smoothing=0.0, mixup=0.0, cutmix=0.0,
                ema=0.0, clip_grad=0.0, amp="auto", compile="auto", compile_mode="default",
                channels_last="auto", device="auto", workers=4, seed=0, deterministic=False,
                tensorboard=False, freeze_backbone=False)
OPTIMIZERS = {"sgd": dict(lr=0.1, weight_decay=5e-4), "adamw": dict(lr=1e-3, weight_decay=0.05)}
RECIPES = {  # per dataset, applied after the optimizer's
    "mnist": dict(epochs=10, augment="none"), "fashion-mnist": dict(epochs=20, augment="none"),
    "kmnist": dict(epochs=20, augment="none"), "svhn": dict(epochs=20, augment="none", lr=0.05),  # no flips
    "cifar10": dict(epochs=30), "cifar100": dict(epochs=60), "folder": dict(epochs=30),
    "synthetic": dict(epochs=5, augment="none"),
}
MODEL_OPTIONS = ("plain", "residual", "aux_logits", "inception_kernel", "stem", "head", "dropout",
                 "zero_init_residual")
# What a resume may change; every other setting comes from the checkpoint (the same run goes on).
RESUMABLE = ("epochs", "out", "device", "workers", "compile", "compile_mode", "threads", "resume",
             "tensorboard", "data_dir")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # larger factors overflow inside the optimizer
DIVERGED_HINT = "lower the learning rate (--lr {lr:g}) or add --clip-grad / --warmup-epochs"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default in --help, the recipe table as written."""


class Diverged(ValueError):
    """A non-finite loss or model: the run stops (exit 1), the last good checkpoint stays."""


def threads_arg(text):
    return text if text == "auto" else number(int, 1, 4096)(text)


def get_args_parser(argument_default=None):
    """The command line with DEFAULTS (parse_args adds the recipes); argument_default=SUPPRESS: no
    defaults (what a command line gives)."""
    recipes = "\n".join(f"  {k:<14} {', '.join(f'{n}={v}' for n, v in r.items())}"
                        for k, r in {**OPTIMIZERS, **RECIPES}.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argument_default,
                                formatter_class=HelpFormatter,
                                epilog=f"Recipes (defaults by --optimizer, then by --dataset):\n{recipes}")
    count, fraction = number(int, 1, 10**9), number(float, 0, 1, hi_open=True)
    factor = number(float, 0, FLOAT32_MAX, what="a float32")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=sorted(models.MODELS), metavar="NAME", help=", ".join(models.MODELS))
    g.add_argument("--dataset", choices=sorted(data.DATASETS), help="dataset")
    g.add_argument("--data-dir", help="dataset root, torchvision's layout")
    g.add_argument("--image-size", type=count, help="resize to N px (default: native)")
    g.add_argument("--channels", type=int, choices=(1, 3), help="convert to C channels (default: native)")
    g.add_argument("--val-split", type=fraction, help="train fraction held out to pick best.pt")
    g.add_argument("--limit-train", type=count, help="stratified train subset")
    g.add_argument("--limit-test", type=count, help="stratified test subset")
    g.add_argument("--augment", choices=data.AUGMENTS, help="augmentation preset")
    g.add_argument("--cutout", type=number(int, 0, 4096), help="cutout square side in px (0: off)")
    g = p.add_argument_group("model options (default: the model's own)")
    g.add_argument("--plain", action="store_true", help="ResNets without shortcuts")
    g.add_argument("--residual", nargs="?", const="identity", choices=("identity", "projection"),
                   help="GoogLeNet shortcuts (no value: identity)")
    g.add_argument("--aux-logits", action="store_true", help="GoogLeNet auxiliary heads (loss weight 0.3)")
    g.add_argument("--inception-kernel", type=int, choices=(3, 5), help="GoogLeNet: 5 paper, 3 torchvision")
    g.add_argument("--stem", choices=("auto", "cifar", "imagenet"), help="auto: CIFAR stem up to 64 px")
    g.add_argument("--head", choices=("auto", "compact", "paper"), help="VGG head")
    g.add_argument("--dropout", type=fraction, help="dropout before the classifier")
    g.add_argument("--zero-init-residual", action="store_true", help="ResNet blocks start as identities")
    g = p.add_argument_group("transfer learning (README: fine-tune an ImageNet model)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--pretrained", nargs="?", const="DEFAULT", metavar="WEIGHTS",
                   help="torchvision's ImageNet weights (no value: DEFAULT; or e.g. IMAGENET1K_V1)")
    x.add_argument("--init-from", metavar="PATH", help="one of our checkpoints or a state_dict file")
    g.add_argument("--freeze-backbone", action="store_true", help="train only the new head")
    g.add_argument("--backbone-lr-scale", type=number(float, 0, 1e6, lo_open=True), metavar="F",
                   help="the backbone's learning rate is F x --lr")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=number(int, 1, 10**6), help="epochs in all (a resume may raise it)")
    g.add_argument("--batch-size", type=count, help="global batch size")
    g.add_argument("--optimizer", choices=tuple(OPTIMIZERS), help="optimizer")
    g.add_argument("--lr", type=number(float, 0, FLOAT32_MAX, lo_open=True, what="a float32"), help="peak lr")
    g.add_argument("--momentum", type=fraction, help="SGD momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="Nesterov momentum")
    g.add_argument("--weight-decay", type=factor, help="not on BatchNorm and biases")
    g.add_argument("--scheduler", help="lr schedule",
                   choices=("cosine", "step", "multistep", "plateau", "exponential", "onecycle", "none"))
    g.add_argument("--milestones", type=count, nargs="+", help="multistep epochs (default: 50%% and 75%%)")
    g.add_argument("--gamma", type=number(float, 0, 1, lo_open=True), help="lr factor of a decay")
    g.add_argument("--step-size", type=count, help="step: epochs between decays")
    g.add_argument("--patience", type=number(int, 0, 10**6), help="plateau: epochs without improvement")
    g.add_argument("--warmup-epochs", type=number(float, 0, 10**6), help="linear warm-up length")
    g.add_argument("--label-smoothing", type=fraction, help="label smoothing")
    g.add_argument("--mixup", type=number(float, 0, 1e6), help="mixup Beta alpha (0: off)")
    g.add_argument("--cutmix", type=number(float, 0, 1e6), help="cutmix Beta alpha (0: off)")
    g.add_argument("--ema", type=fraction, help="EMA decay of weights, e.g. 0.999 (0: off)")
    g.add_argument("--clip-grad", type=factor, help="max grad norm (0: off)")
    g = p.add_argument_group("speed and runtime (docs/training.md: the auto rules)")
    g.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast dtype of training; auto: bf16 on GPUs and CPUs that have it natively")
    g.add_argument("--compile", nargs="?", const="on", choices=SWITCH, help="torch.compile (no value: on); "
                   f"auto: on CUDA, on the CPU for runs of >= {runtime.COMPILE_MIN_STEPS_CPU} steps")
    g.add_argument("--compile-mode", help="torch.compile mode",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    g.add_argument("--channels-last", nargs="?", const="on", choices=SWITCH, help="NHWC (no value: on)")
    g.add_argument("--threads", type=threads_arg, help="CPU threads (default: torch's); auto: free")
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), help="auto: cuda, mps, cpu")
    g.add_argument("--workers", type=number(int, 0, 256), help="dataloader path only")
    g.add_argument("--seed", type=number(int, 0, 2**32 - 1), help="seed of weights, data order, augmentation")
    g.add_argument("--deterministic", action="store_true", help="repeatable kernels (slower)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run dir (default: runs/<dataset>-<model>-<time>)")
    g.add_argument("--resume", metavar="CKPT", help="continue the run of this checkpoint")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    if argument_default is None:
        p.set_defaults(**DEFAULTS, **OPTIMIZERS["sgd"])
    return p


def flag_text(dest, v):
    """'--lr 0.5', '--plain', '--no-nesterov', '--milestones 3 6': a value as typed."""
    flag = "--" + dest.replace("_", "-")
    if isinstance(v, bool):
        return flag if v else f"--no-{flag[2:]}"
    return f"{flag} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"


def parse_args(argv=None):
    """The run's settings: argparse's defaults with the given --optimizer's and --dataset's recipes
    as defaults; on --resume the checkpoint's settings and the RESUMABLE flags given (a warning
    names every other flag given: a resume does not apply it)."""
    given = vars(get_args_parser(argparse.SUPPRESS).parse_args(argv))
    if "resume" in given:
        saved = checkpoint.load_checkpoint(given["resume"])["args"]
        ignored = [f"{flag_text(k, v)} (checkpoint: {saved.get(k)})" for k, v in given.items()
                   if k not in RESUMABLE and v != saved.get(k)]
        if ignored and int(os.environ.get("RANK", 0)) == 0:
            may = ", ".join(flag_text(k, True) for k in RESUMABLE if k != "resume")
            print(f"warning: a resume keeps the run's settings; ignored: {', '.join(ignored)} (a resume may "
                  f"change only {may})", file=sys.stderr)
        a = argparse.Namespace(**{**vars(get_args_parser().parse_args([])), **saved, "out": None,
                                  "threads": None, **{k: v for k, v in given.items() if k in RESUMABLE}})
        a.out = a.out or str(Path(a.resume).parent)
        return a
    if "model" not in given or "dataset" not in given:
        get_args_parser().error("--model and --dataset are required (or --resume CKPT)")
    p = get_args_parser()
    p.set_defaults(**OPTIMIZERS[given.get("optimizer", "sgd")], **RECIPES.get(given["dataset"], {}))
    return p.parse_args(argv)


def check_args(a):
    """What no single flag's range can say."""
    if a.scheduler == "plateau" and not a.val_split:
        raise ValueError("--scheduler plateau watches validation loss: give --val-split > 0 (it never "
                         "looks at the test set)")
    if (a.freeze_backbone or a.backbone_lr_scale) and not (a.pretrained or a.init_from):
        raise ValueError("--freeze-backbone and --backbone-lr-scale need --pretrained or --init-from")
    if a.freeze_backbone and a.backbone_lr_scale:
        raise ValueError("--backbone-lr-scale has no effect with --freeze-backbone (the backbone is fixed)")
    if a.pretrained:
        checkpoint.pretrained_weights(a.model, a.pretrained)
    if a.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard")


def build_optimizer(model, device, *, optimizer="sgd", lr, weight_decay, momentum=0.9, nesterov=True,
                    backbone_lr_scale=None):
    """SGD or AdamW over the trainable parameters, no weight decay on BatchNorm/bias (1-D) tensors.
    --backbone-lr-scale F: the head's groups first at lr, then the backbone's at F x lr."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    parts = [(params, lr)]
    if backbone_lr_scale and backbone_lr_scale != 1:
        heads = tuple(h + "." for h in checkpoint.head_names(model))
        parts = [([(n, p) for n, p in params if n.startswith(heads)], lr),
                 ([(n, p) for n, p in params if not n.startswith(heads)], lr * backbone_lr_scale)]
    groups = [g for part, group_lr in parts for g in (
        {"params": [p for _, p in part if p.ndim > 1], "weight_decay": weight_decay, "lr": group_lr},
        {"params": [p for _, p in part if p.ndim <= 1], "weight_decay": 0.0, "lr": group_lr}) if g["params"]]
    fused = {"fused": True} if device.type == "cuda" else {}
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **fused)
    return torch.optim.AdamW(groups, lr=lr, **fused)


class Schedule:
    """Learning rate as a pure function of the iteration, stepped once per optimizer step:
    lr(it) = base_lr * warmup(it) * shape(it) * plateau_scale. step, multistep and exponential
    change at epoch boundaries; cosine and onecycle every step. milestones None: 50% and 75%."""

    def __init__(self, optimizer, name, epochs, iters_per_epoch, warmup_epochs=0.0, milestones=None,
                 gamma=0.1, step_size=30, patience=5):
        self.optimizer, self.name, self.ipe = optimizer, name, iters_per_epoch
        self.total, self.warmup = epochs * iters_per_epoch, int(round(warmup_epochs * iters_per_epoch))
        self.milestones = [int(epochs * 0.5), int(epochs * 0.75)] if milestones is None else list(milestones)
        self.gamma, self.step_size, self.patience = gamma, step_size, patience
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
        elif self.name == "onecycle":  # torch's OneCycleLR (pct_start 0.3, div 25, final div 1e4, cosine)
            up_end, down_end = 0.3 * self.total - 1, self.total - 1
            if it <= up_end:
                start, stop, pct = 1 / 25, 1.0, it / up_end
            else:
                start, stop, pct = 1.0, 1 / 25e4, min(1.0, (it - up_end) / (down_end - up_end))
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
        """Plateau: multiply by gamma after `patience` epochs without validation improvement."""
        if self.name != "plateau" or val_loss is None:
            return
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.scale, self.bad_epochs = self.scale * self.gamma, 0
                self._apply()

    def state_dict(self):
        return {"it": self.it, "scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, s):
        self.it, self.scale, self.best, self.bad_epochs = s["it"], s["scale"], s["best"], s["bad_epochs"]
        self._apply()


class EMA:
    """Exponential moving average of the weights (torch.optim.swa_utils' rule); buffers copied."""

    def __init__(self, model, decay):
        self.decay, self.module = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


def mix_batch(x, y, mixup, cutmix, rng):
    """Mixup or cutmix (one picked at random per batch when both are on) -> (x, y, y2, lam): loss =
    lam CE(y) + (1 - lam) CE(y2). rng: a numpy Generator seeded per epoch (no device sync)."""
    modes = [m for m, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0]
    if not modes:
        return x, y, y, 1.0
    mode = modes[rng.integers(len(modes))]
    lam = float(rng.beta(mixup, mixup) if mode == "mixup" else rng.beta(cutmix, cutmix))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device, non_blocking=True)
    if mode == "mixup":
        return x * lam + x[perm] * (1 - lam), y, y[perm], lam
    H, W = x.shape[-2:]
    h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(H)), int(rng.integers(W))
    y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return x, y, y[perm], 1 - (y1 - y0) * (x1 - x0) / (H * W)


def train_one_epoch(model, loader, optimizer, schedule, scaler, criterion, *, epoch, device, amp_dtype=None,
                    mixup=0.0, cutmix=0.0, clip_grad=0.0, seed=0, rank=0, ema=None, progress=None):
    """One pass -> (mean loss, accuracy, images seen); mixing draws seeded by (seed, epoch, rank).
    Sums stay on the device; the host syncs every CHECK_EVERY steps and after the last one (so no
    checkpoint holds an unchecked update) to catch a non-finite loss or model."""
    CHECK_EVERY = 50
    model.train()
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    first_bad, seen = torch.full((), -1, device=device, dtype=torch.long), 0
    rng = np.random.default_rng([seed, epoch, rank])
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for step, (x, y) in enumerate(loader):
        x, y, y2, lam = mix_batch(x, y, mixup, cutmix, rng)
        with autocast:
            out = model(x)
            out, *aux = out if isinstance(out, (tuple, list)) else (out,)
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
        seen, loss = seen + y.shape[0], loss.detach()
        loss_sum += loss.float() * y.shape[0]
        correct += (out.detach().argmax(1) == y).sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == len(loader):
            bad_step, bad_model = any_rank(torch.stack([first_bad, (~finite(unwrap(model), ema)).long()]))
            hint = DIVERGED_HINT.format(lr=optimizer.defaults["lr"])
            if bad_step >= 0:
                raise Diverged(f"loss became non-finite at epoch {epoch + 1}, step {bad_step + 1}; {hint}")
            if bad_model:
                raise Diverged(f"the model's weights or BatchNorm statistics became non-finite at epoch "
                               f"{epoch + 1} (by step {step + 1}; the loss was still finite); {hint}")
        if progress is not None:
            progress.update(1)
    if dist.is_initialized():
        t = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device)])
        dist.all_reduce(t)
        loss_sum, correct, seen = t[0], t[1], int(t[2])
    return float(loss_sum) / max(seen, 1), float(correct) / max(seen, 1), seen


def finite(model, ema=None):
    """A 0-dim bool on the device, no host sync: every float parameter and buffer of the model and
    its EMA is finite (the max-abs norm over all of them is finite exactly then)."""
    tensors = [t.detach() for m in (model, ema.module if ema is not None else None) if m is not None
               for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    return torch.isfinite(nn.utils.get_total_norm(tensors, math.inf)) if tensors else torch.tensor(True)


def any_rank(flags):
    """Small long flags maxed over the DDP ranks, read on the host: all ranks stop together."""
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


def unwrap(model):
    """The plain nn.Module under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def build_run(a, d, device, rank, world, resume_ck):
    """Everything a run trains with (a dict): model, loaders, optimizer, schedule, scaler, EMA,
    loss, history and the epoch it starts at."""
    steps = a.epochs * max(1, len(d.train) // a.batch_size)  # all epochs: a resume decides as the run did
    speed = runtime.pick_speed(device, amp=a.amp, compile=a.compile, channels_last=a.channels_last,
                               threads=a.threads, train_steps=steps, deterministic=a.deterministic)
    torch.set_num_threads(speed["threads"])
    opts = {k: getattr(a, k) for k in MODEL_OPTIONS if getattr(a, k) not in (None, False)}
    if a.pretrained:  # torchvision's layout: ImageNet stem, VGG's paper head, GoogLeNet's 3x3 kernel
        opts = checkpoint.pretrained_options(a.model, opts)
    model = models.build_model(a.model, d.num_classes, d.in_channels, d.image_size, **opts)
    init = resume_ck["init"] if resume_ck else None
    if resume_ck:
        for key, have in (("num_classes", d.num_classes), ("in_channels", d.in_channels),
                          ("image_size", d.image_size), ("classes", list(map(str, d.classes)))):
            if resume_ck[key] is not None and resume_ck[key] != have:
                raise checkpoint.CheckpointError(f"cannot resume {a.resume} on {a.data_dir}: the checkpoint "
                                                 f"has {key} {resume_ck[key]}, the data {have}"[:400])
        checkpoint.load_weights(model, resume_ck["model"], a.model, f"cannot resume {a.resume}: its weights")
    elif a.pretrained or a.init_from:
        state, init = (checkpoint.torchvision_weights(a.model, a.pretrained, d.image_size) if a.pretrained
                       else checkpoint.load_init(a.init_from))
        line = checkpoint.load_transfer(model, state, new_head=bool(a.pretrained))
        if rank == 0:
            print(f"init from {init.get('weights') or init['source']}: {line}", flush=True)
            if a.pretrained and d.image_size < 64:
                print(f"warning: {init['weights']} was trained on {init['image_size']} px images; at "
                      f"{d.image_size} px its last stages see maps of 1-2 px: pass --image-size "
                      f"{init['image_size']} for better transfer (README: fine-tune)", file=sys.stderr)
    if init and init.get("mean") and init.get("std"):  # normalize as the weights were trained
        d.mean, d.std = (tuple(checkpoint.for_channels(init[k], d.in_channels)) for k in ("mean", "std"))
    if a.freeze_backbone:
        trainable = checkpoint.freeze_backbone(model)
        if rank == 0:
            print(f"frozen backbone: training {', '.join(trainable)} only", flush=True)
    kw = dict(mean=d.mean, std=d.std, device=device, channels_last=speed["channels_last"], seed=a.seed,
              workers=a.workers)
    loaders = {"train": data.make_loader(d.train, batch_size=a.batch_size // world, train=True, rank=rank,
                                         augment=a.augment, cutout=a.cutout, world_size=world, **kw)}
    for split, s in (("val", d.val), ("test", d.test)):
        loaders[split] = s and data.make_loader(s, batch_size=max(256, a.batch_size), train=False, **kw)
    model = model.to(device, memory_format=torch.channels_last if speed["channels_last"] else None)
    optimizer = build_optimizer(model, device, optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay,
                                momentum=a.momentum, nesterov=a.nesterov,
                                backbone_lr_scale=a.backbone_lr_scale)
    schedule = Schedule(optimizer, a.scheduler, a.epochs, len(loaders["train"]), a.warmup_epochs,
                        a.milestones, a.gamma, a.step_size, a.patience)
    scaler = torch.amp.GradScaler(device.type, enabled=speed["amp"] == torch.float16)
    ema = EMA(model, a.ema) if a.ema > 0 else None
    if resume_ck:
        restore_state(resume_ck, a.resume, optimizer, schedule, scaler, ema, device)
    history, train_model = list(resume_ck["history"]) if resume_ck else [], model
    if world > 1:  # plain ImageNet ResNets keep (unused) projection convs for parameter parity
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(a.plain))
    if speed["compile"]:  # compiled lazily: epoch 1's time includes compilation
        if rank == 0 and (note := runtime.cudagraph_note(a.compile_mode, world, model)):
            print(note, file=sys.stderr)
        train_model = torch.compile(train_model, mode=None if a.compile_mode == "default" else a.compile_mode)
    return dict(a=a, d=d, device=device, speed=speed, rank=rank, world=world, opts=opts, init=init,
                model=model, train_model=train_model, optimizer=optimizer, schedule=schedule, scaler=scaler,
                ema=ema, criterion=nn.CrossEntropyLoss(label_smoothing=a.label_smoothing), loaders=loaders,
                history=history, start_epoch=resume_ck["epoch"] if resume_ck else 0,
                best_val=max([r["val_acc"] for r in history if r.get("val_acc") is not None], default=-1.0))


def restore_state(ck, path, optimizer, schedule, scaler, ema, device):
    """The rest of a resumed run's state (one CheckpointError line for a part that does not fit); the
    CUDA RNG state is the process's own device's, the only one its kernels used."""
    for part, load, state in (("optimizer", optimizer.load_state_dict, ck["optimizer"]),
                              ("scheduler", schedule.load_state_dict, ck["scheduler"]),
                              ("scaler", scaler.load_state_dict, ck["scaler"]),
                              ("ema", ema and ema.module.load_state_dict, ck["ema"]),
                              ("rng", torch.set_rng_state, ck["rng"]["torch"]),
                              ("cuda rng", lambda s: torch.cuda.set_rng_state(s, device),
                               ck["rng"].get("cuda") if device.type == "cuda" else None)):
        try:
            if load and state is not None:
                load(state)
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise checkpoint.CheckpointError(f"cannot resume {path}: its {part} state does not fit this run "
                                             f"({type(e).__name__}: {runtime.one_line(e, 200)})") from None


def open_run_dir(run, out, resume_ck):
    """Lock the run dir (returned), refuse one holding another run, repair best.pt, write config.json."""
    a, d = run["a"], run["d"]
    out.mkdir(parents=True, exist_ok=True)
    lock = checkpoint.lock_run_dir(out)  # held until the run ends: one train.py per run dir
    try:
        checkpoint.claim_run_dir(out, a.resume)
        if resume_ck:
            checkpoint.repair_best(out, resume_ck, a.resume)
        if run["start_epoch"] >= a.epochs:  # after the repair: a finished run gets its best.pt back too
            raise ValueError(f"{a.resume} already finished {run['start_epoch']} epochs; pass --epochs N with "
                             f"N > {run['start_epoch']} to train further")
        speed = {**run["speed"], "amp": str(run["speed"]["amp"]), "eval_amp": str(run["speed"]["eval_amp"])}
        config = dict(vars(a), model_options=run["opts"], num_classes=d.num_classes, image_size=d.image_size,
                      in_channels=d.in_channels, classes=list(map(str, d.classes)), mean=list(d.mean),
                      std=list(d.std), init=run["init"], device=str(run["device"]), world_size=run["world"],
                      amp_dtype=speed["amp"], torch=torch.__version__, speed=speed, test_samples=len(d.test),
                      train_samples=len(d.train), val_samples=len(d.val or []))
        runtime.write_text(out / "config.json", json.dumps(config, indent=2))
    except BaseException:
        lock.close()
        raise
    print(f"{a.model} on {a.dataset}: {len(d.train)} train / {len(d.val or [])} val / {len(d.test)} test, "
          f"{sum(p.numel() for p in run['model'].parameters()):,} params, device {run['device']}, amp "
          f"{run['speed']['amp']}, world {run['world']}, out {out}", flush=True)
    print(f"speed: {runtime.describe_speed(run['speed'])}", flush=True)
    return lock


def run_epoch(run, epoch, progress=None):
    """Train one epoch, then evaluate -> (metrics row, validation result); Diverged unless the loss,
    the model, its EMA and the evaluation losses are finite (what save_epoch() writes was checked)."""
    a, loaders, net = run["a"], run["loaders"], run["train_model"]
    loaders["train"].set_epoch(epoch)
    t0, lr = time.perf_counter(), run["optimizer"].param_groups[0]["lr"]
    train_loss, train_acc, seen = train_one_epoch(
        net, loaders["train"], run["optimizer"], run["schedule"], run["scaler"], run["criterion"],
        epoch=epoch, device=run["device"], amp_dtype=run["speed"]["amp"], mixup=a.mixup, cutmix=a.cutmix,
        clip_grad=a.clip_grad, seed=a.seed, rank=run["rank"], ema=run["ema"], progress=progress)
    train_seconds = time.perf_counter() - t0
    if progress is not None:
        progress.close()

    def score(model, loader):
        return loader and evaluate(model, loader, run["d"].num_classes, amp_dtype=run["speed"]["eval_amp"])
    val, test = score(net, loaders["val"]), score(net, loaders["test"])
    ema = run["ema"] and score(run["ema"].module, loaders["test"])
    bad = [f"{name} loss {r['loss']}" for name, r in (("validation", val), ("test", test), ("EMA test", ema))
           if r is not None and not math.isfinite(r["loss"])]
    if bad:  # finite weights whose eval-mode outputs are not (e.g. huge BatchNorm statistics)
        raise Diverged(f"the model's outputs became non-finite at epoch {epoch + 1} ({', '.join(bad)}); "
                       f"{DIVERGED_HINT.format(lr=a.lr)}")
    run["schedule"].epoch_end(val["loss"] if val else None)
    row = dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=train_acc,
               val_loss=val and val["loss"], val_acc=val and val["top1"], test_loss=test["loss"],
               test_top1=test["top1"], test_top5=test["top5"], epoch_seconds=time.perf_counter() - t0,
               images_per_second=seen / train_seconds, ema_test_top1=ema and ema["top1"])
    run["history"].append(row)
    return row, val


def save_epoch(run, out, val, writer=None):
    """last.pt; best.pt as its second name when the epoch is the best (one write: a kill in between
    leaves best.pt an epoch behind, which a resume repairs); metrics.csv. True if val top-1 improved."""
    a, d, row, device = run["a"], run["d"], run["history"][-1], run["device"]
    ck = checkpoint.make_checkpoint(
        model_name=a.model, model_options=run["opts"], num_classes=d.num_classes, in_channels=d.in_channels,
        image_size=d.image_size, classes=d.classes, mean=d.mean, std=d.std,
        args=dict(vars(a)), epoch=row["epoch"], model=run["model"].state_dict(),
        ema=run["ema"].module.state_dict() if run["ema"] else None, optimizer=run["optimizer"].state_dict(),
        scheduler=run["schedule"].state_dict(), scaler=run["scaler"].state_dict(),
        rng={"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        history=run["history"], init=run["init"])
    checkpoint.save(ck, out / "last.pt")
    improved = val is not None and val["top1"] > run["best_val"]
    if improved or val is None:
        run["best_val"] = val["top1"] if val else run["best_val"]
        checkpoint.link(out / "last.pt", out / "best.pt")
    compare.write_metrics(run["history"], out / "metrics.csv")
    for k, v in row.items():
        if writer is not None and k != "epoch" and v is not None:
            writer.add_scalar(k, v, row["epoch"])
    return improved


def epoch_line(r, epochs):
    val = f"val loss {r['val_loss']:.4f} acc {r['val_acc']:.2%} | " if r["val_loss"] is not None else ""
    ema = f" | ema top-1 {r['ema_test_top1']:.2%}" if r["ema_test_top1"] is not None else ""
    return (f"epoch {r['epoch']}/{epochs} lr {r['lr']:.4g} train loss {r['train_loss']:.4f} acc "
            f"{r['train_acc']:.2%} | {val}test loss {r['test_loss']:.4f} top-1 {r['test_top1']:.2%} top-5 "
            f"{r['test_top5']:.2%} | {r['epoch_seconds']:.1f}s {r['images_per_second']:.0f} img/s{ema}")


def finish(run, out, session_seconds):
    """curves.png and the closing summary line."""
    a, h, last = run["a"], run["history"], run["history"][-1]
    compare.plot_curves(h, out / "curves.png", f"{a.model} on {a.dataset}, run {out.name}")
    best = max((r for r in h if r.get("val_acc") is not None), key=lambda r: r["val_acc"], default=None)
    gpu = run["device"].type == "cuda" and torch.cuda.max_memory_allocated(run["device"]) / 2**30
    print(f"done: {a.model} on {a.dataset}, {last['epoch']} epochs"
          + (f", best val top-1 {best['val_acc']:.2%} (epoch {best['epoch']})" if best else "")
          + f", final test top-1 {last['test_top1']:.2%} top-5 {last['test_top5']:.2%}, train time "
          f"{sum(r['epoch_seconds'] for r in h):.1f}s (this session {session_seconds:.1f}s), "
          f"{sum(r['images_per_second'] for r in h) / len(h):.0f} img/s"
          + (f", peak GPU memory {gpu:.2f} GiB" if gpu else "") + f"; checkpoints in {out}", flush=True)


def main(a):
    """One run from parse_args()'s settings; what a user can fix is a one-line ValueError / OSError,
    Ctrl-C a KeyboardInterrupt saying how to resume."""
    check_args(a)
    resume_ck = None
    if a.resume:
        resume_ck = checkpoint.load_checkpoint(a.resume)
        checkpoint.check_resumable(resume_ck, a.resume)
    try:
        rank, world, device = runtime.start(a.device, seed=a.seed, deterministic=a.deterministic)
        if a.batch_size % world:
            raise ValueError(f"--batch-size {a.batch_size} must be divisible by the {world} processes")
        d = data.load_data(a.dataset, a.data_dir, image_size=a.image_size, channels=a.channels, seed=a.seed,
                           val_split=a.val_split, limit_train=a.limit_train, limit_test=a.limit_test)
        run = build_run(a, d, device, rank, world, resume_ck)
    except KeyboardInterrupt:
        again = f" (resume with: python train.py --resume {a.resume})" if a.resume else ""
        raise KeyboardInterrupt(f"interrupted before training started; nothing was written{again}") from None
    out = Path(a.out or os.path.join("runs", f"{a.dataset}-{a.model}-{time.strftime('%Y%m%d-%H%M%S')}"))
    lock, writer, epoch = None, None, run["start_epoch"]
    try:
        if rank == 0:  # (a finished run: rank 0 refuses it, the others have no epoch left)
            lock = open_run_dir(run, out, resume_ck)
            resume_ck = None  # its state lives in the run now
            if a.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(str(out / "tb"))
        wall0 = time.perf_counter()
        for epoch in range(run["start_epoch"], a.epochs):
            progress = None
            if rank == 0 and sys.stdout.isatty():
                from tqdm import tqdm
                progress = tqdm(total=len(run["loaders"]["train"]), desc=f"epoch {epoch + 1}/{a.epochs}",
                                leave=False)
            row, val = run_epoch(run, epoch, progress)
            if rank == 0:
                best = save_epoch(run, out, val, writer)
                print(epoch_line(row, a.epochs) + (" *" if best else ""), flush=True)
        if rank == 0 and run["history"]:
            finish(run, out, time.perf_counter() - wall0)
    except KeyboardInterrupt:  # where the run stopped and the command that continues it
        last = out / "last.pt"
        again = rank == 0 and (last if last.exists() else a.resume and f"{a.resume} --out {out}")
        raise KeyboardInterrupt(f"interrupted at epoch {epoch + 1}" + (
            f"; resume with: python train.py --resume {again}" if again
            else ", before the first checkpoint: nothing to resume")) from None
    except RuntimeError as e:  # --deterministic on an op without a deterministic kernel
        if "deterministic" not in str(e):
            raise
        raise ValueError(f"--deterministic: {runtime.one_line(e, 200)}; run without it") from None
    finally:
        if writer is not None:
            writer.close()
        if lock is not None:
            lock.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv=None):
    """The command line's exit status (runtime.run_cli): 0; 1 with one `error:` line; 130 on Ctrl-C."""
    return runtime.run_cli(main, parse_args, argv, oom_hint="lower --batch-size (or --image-size)")


if __name__ == "__main__":
    sys.exit(cli())
