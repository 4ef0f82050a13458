"""Weights in and out: the checkpoint format (SCHEMA's fields, docs/training.md: made, saved atomically,
loaded and checked here only), torchvision's weights and transfer, the run dir's lock and best.pt repair.

    import checkpoint
    ck = checkpoint.load_checkpoint("runs/demo/best.pt")     # weights_only load + every field checked
    model = checkpoint.model_from_checkpoint(ck)              # rebuilt from the file alone, eval mode
"""
import errno
import math
import os
import pickle
import re
import shutil
import sys
from numbers import Real
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn

import data
from models import MODELS, InceptionAux, build_model
from runtime import one_line, replacing

FORMAT = "deeper-networks/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe, not ours or malformed (one line)."""


def _int(lo):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"an integer >= {lo}"


def _state(v):
    return isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(t) for k, t in v.items())


def _reals(positive):
    def ok(x):
        return type(x) is not bool and isinstance(x, Real) and math.isfinite(x) and (x > 0 or not positive)
    return lambda v: isinstance(v, (list, tuple)) and v and all(map(ok, v))


def _is(kind, items=object):  # isinstance(v, kind) with every element (a dict's keys) an `items`
    return lambda v: isinstance(v, kind) and all(isinstance(x, items) for x in v)


def _or_none(check):
    return lambda v: v is None or check(v)


# field -> (check, what it must be). Optional fields may be None (a weights-only checkpoint);
# the cross-field rules (classes and mean/std lengths) are in check_fields.
SCHEMA = {
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "model_name": (lambda v: isinstance(v, str) and v in MODELS, "a model name of models.MODELS"),
    "model_options": (_is(dict, str), "a dict of options"),
    "num_classes": _int(1), "in_channels": _int(1), "image_size": _int(1),
    "model": (_state, "a state_dict (names -> tensors)"),
    "classes": (_or_none(_is(list, str)), "None or a list of class names (strings)"),
    "mean": (_or_none(_reals(False)), "None or a list of finite numbers"),
    "std": (_or_none(_reals(True)), "None or a list of numbers > 0"),
    "args": (_is(dict, str), "a dict of training arguments"),
    "epoch": _int(0),
    "ema": (_or_none(_state), "None or a state_dict"),
    "optimizer": (_or_none(_is(dict)), "None or an optimizer state dict"),
    "scheduler": (_or_none(_is(dict)), "None or a scheduler state dict"),
    "scaler": (_or_none(_is(dict)), "None or a GradScaler state dict"),
    "rng": (_or_none(lambda v: isinstance(v, dict) and torch.is_tensor(v.get("torch"))),
            "None or a dict with the torch RNG state"),
    "history": (_is(list, dict), "a list of dicts"),
    "init": (_or_none(_is(dict)), "None or a dict"),
}
REQUIRED = ("format", "model_name", "model_options", "num_classes", "in_channels", "image_size", "model")
# Without these a checkpoint holds weights only: it cannot continue a run.
RESUME_KEYS = ("args", "epoch", "optimizer", "scheduler", "scaler", "rng", "history")


def _show(v):
    s = repr(v) if isinstance(v, (str, int, float, bool, type(None))) else type(v).__name__
    return s if len(s) <= 60 else s[:57] + "..."


def check_fields(ck, path):
    """Every field's type and shape, once: CheckpointError "CKPT: <field> is <what>, expected <what>"
    for the first that is wrong. Absent optional fields become None (args {}, history [])."""
    missing = [k for k in REQUIRED if k not in ck]
    if missing:
        raise CheckpointError(f"{path} is not a deeper-networks checkpoint (missing: {', '.join(missing)})")
    if ck["format"] != FORMAT:
        raise CheckpointError(f"{path} is not a deeper-networks checkpoint: its format is "
                              f"{_show(ck['format'])}, this program reads {FORMAT!r}")
    ck = {**dict.fromkeys(SCHEMA), "args": {}, "history": [], **ck}
    for key, (ok, expected) in SCHEMA.items():
        if not ok(ck[key]):
            raise CheckpointError(f"{path}: {key} is {_show(ck[key])}, expected {expected}")
    for key, size in (("classes", "num_classes"), ("mean", "in_channels"), ("std", "in_channels")):
        if ck[key] is not None and len(ck[key]) != ck[size]:
            raise CheckpointError(f"{path}: {key} has {len(ck[key])} entries, expected {ck[size]} ({size})")
    return ck


def make_checkpoint(*, model_name, model_options, num_classes, in_channels, image_size, model,
                    classes=None, mean=None, std=None, args=None, epoch=0, ema=None, optimizer=None,
                    scheduler=None, scaler=None, rng=None, history=None, init=None):
    """The checkpoint dict; `model` / `ema`: state_dicts of the unwrapped module (no prefixes)."""
    return {"format": FORMAT, "model_name": model_name, "model_options": dict(model_options),
            "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
            "classes": [str(c) for c in classes] if classes is not None else None,
            "mean": [float(m) for m in mean] if mean is not None else None,
            "std": [float(s) for s in std] if std is not None else None,
            "args": dict(args or {}), "epoch": epoch, "model": model, "ema": ema, "optimizer": optimizer,
            "scheduler": scheduler, "scaler": scaler, "rng": rng, "history": list(history or []),
            "init": init}


def save(ck, path):
    """Write atomically: a kill or a full disk never leaves half a file in place of a good one."""
    # Through a Python file, whose write() raises OSError(ENOSPC) on a full disk; given a path, torch
    # writes through its own stream and reports only "unexpected pos N vs M".
    with replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(ck, f)


def link(src, dst):
    """Give the saved file `src` the name `dst` too, atomically (a hard link, or a copy where the
    file system has none). save() replaces files, never edits them, so the names stay independent."""
    with replacing(dst) as tmp:
        tmp.unlink(missing_ok=True)  # a stale temp file from a killed run: os.link will not overwrite it
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise
            shutil.copyfile(src, tmp)  # no hard links here (FAT, some network file systems)


# What torch's weights_only unpickler says when a file asks for code or objects ("Unsupported global:
# GLOBAL x.y was not an allowed global"; torch 2.14: "... whose module posix is blocked") or a call.
_BLOCKED = re.compile(r"unsupported global|whose module \S+ is blocked|call reduce for unrecognized "
                      r"function|can only (?:create new object|build)", re.IGNORECASE)


def load_file(path):
    """torch.load(path, weights_only=True) on the CPU, or one CheckpointError line saying why not."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _BLOCKED.search(str(e)):
            raise CheckpointError(f"refusing to load {path}: it contains pickled code/objects that are "
                                  "not plain weights (loaded with weights_only=True)") from None
        reason = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(e))  # a non-zip, non-pickle file
        why = f"not a torch.save file ({reason[1].strip()})" if reason else one_line(e, 200)
        raise CheckpointError(f"cannot read checkpoint {path}: {why}") from None
    except EOFError:
        raise CheckpointError(f"cannot read checkpoint {path}: empty or truncated file") from None
    except Exception as e:  # RuntimeError (bad zip), OSError (a directory), ...
        raise CheckpointError(f"cannot read checkpoint {path}: "
                              f"{one_line(str(e).split('. ')[0], 200)}") from None


def load_checkpoint(path):
    """A deeper-networks checkpoint, loaded with weights_only=True and checked field by field."""
    ck = load_file(path)
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path} is not a deeper-networks checkpoint (a {type(ck).__name__})")
    return check_fields(ck, path)


def check_resumable(ck, path):
    missing = [k for k in RESUME_KEYS if ck.get(k) is None or k == "args" and not ck[k]]
    if missing:
        raise CheckpointError(f"{path} is a weights-only checkpoint (no {', '.join(missing)}): use it with "
                              "evaluate.py or export.py (or --init-from for a new run), not with --resume")


def load_weights(model, state, name, what="the checkpoint's weights"):
    """model.load_state_dict(state), or a CheckpointError naming the first mismatch."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # 'Error(s) in loading state_dict for X:' then one line per problem
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"{what} do not fit {name}: {(lines[1:] or lines or ['?'])[0][:300]}") from None


def model_from_checkpoint(ck, ema=False):
    """The checkpoint's model (its EMA weights if ema and present), in eval mode, on the CPU."""
    model = build_model(ck["model_name"], ck["num_classes"], ck["in_channels"], ck["image_size"],
                        **ck["model_options"])
    load_weights(model, ck["ema"] if ema and ck.get("ema") else ck["model"], ck["model_name"])
    return model.eval()


def checkpoint_data(ck, source, *, dataset=None, data_dir=None, download=False, **overrides):
    """The data a checkpoint was trained and tested on, from its recorded arguments, labelled in the
    order of its classes (data.match_classes). `dataset`, `data_dir`, `overrides` replace recorded ones."""
    a = ck["args"]
    name = dataset or a.get("dataset")
    if not name:
        raise data.DataError(f"{source} does not record its dataset; pass --dataset")
    d = data.load_data(name, data_dir or a.get("data_dir") or "data", **{
        "image_size": ck["image_size"], "channels": ck["in_channels"], "seed": a.get("seed") or 0,
        "val_split": a.get("val_split") or 0.0, "limit_train": a.get("limit_train"),
        "limit_test": a.get("limit_test"), "download": download, **overrides})
    if ck["classes"] is None and d.num_classes != ck["num_classes"]:
        raise data.DataError(f"dataset {name} has {d.num_classes} classes but {source} was trained "
                             f"for {ck['num_classes']}")
    d, note = (d, None) if ck["classes"] is None else data.match_classes(d, ck["classes"], source)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return d


def load_init(path):
    """(state_dict, init) for --init-from: one of our checkpoints (its weights and the mean/std they were
    trained with) or a state_dict file, e.g. torchvision's .pth (DDP/compile prefixes dropped)."""
    ck = load_file(path)
    if isinstance(ck, dict) and ck.get("format") == FORMAT:
        ck = check_fields(ck, path)
        return ck["model"], {"source": str(path), "model_name": ck["model_name"], "mean": ck["mean"],
                             "std": ck["std"], **({"init": ck["init"]} if ck["init"] else {})}
    if _state(ck) and ck:
        return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in ck.items()}, {"source": str(path)}
    raise CheckpointError(f"{path} is neither a deeper-networks checkpoint nor a state_dict (of tensors)")


class WeightsError(ValueError):
    """Pretrained weights that cannot be had or do not apply (one-line message)."""


# Model name prefix -> the options under which our model is torchvision's architecture (its weights fit).
_TORCHVISION_LAYOUT = {"resnet": {"stem": "imagenet", "plain": False}, "alexnet": {"stem": "imagenet"},
                       "googlenet": {"stem": "imagenet", "inception_kernel": 3, "residual": None},
                       "vgg": {"head": "paper"}}


def pretrained_options(name, options):
    """`options` completed with what torchvision's layout needs (ImageNet stem, VGG's paper head,
    GoogLeNet's 3x3 kernel); WeightsError for a model without weights or an option against them."""
    import torchvision
    published = set(torchvision.models.list_models(module=torchvision.models))
    names = [n for n in MODELS if n in published]  # registry order
    if name not in names:
        raise WeightsError(f"{name} has no torchvision ImageNet weights; --pretrained works with: "
                           f"{', '.join(names)}")
    out = {k: v for k, v in options.items() if v is not None}
    for k, need in next(v for p, v in _TORCHVISION_LAYOUT.items() if name.startswith(p)).items():
        given = out.get(k, "auto")
        if given == "auto" and need not in (None, False):
            out[k] = need
        elif given not in ("auto", need):
            raise WeightsError(f"{name} with {k}={given!r} has no torchvision ImageNet weights (they "
                               f"need {k}={need!r}); --pretrained works with: {', '.join(names)} in "
                               "torchvision's layout (no plain twins, residual or 5x5 GoogLeNet, CIFAR stem)")
    return out


def pretrained_weights(name, weights="DEFAULT"):
    """torchvision's weights enum member for `name`: 'DEFAULT', a member name such as
    'IMAGENET1K_V1', or the full 'ResNet18_Weights.IMAGENET1K_V1'; WeightsError otherwise."""
    import torchvision
    pretrained_options(name, {})  # refuses models without weights
    enum = torchvision.models.get_model_weights(name)
    prefix, _, member = (weights or "DEFAULT").rpartition(".")
    if prefix not in ("", enum.__name__) or member not in enum.__members__:
        raise WeightsError(f"{name} has no weights {weights!r}; choose from: {', '.join(enum.__members__)}")
    return enum[member]


def torchvision_weights(name, weights="DEFAULT", image_size=None):
    """(state_dict, init) of torchvision's published weights for `name`, from the torch hub cache
    (downloaded there when missing; else a WeightsError saying where to put the file). init: their
    source, weights, the mean/std they expect and image_size, the crop they were trained on."""
    w = pretrained_weights(name, weights)
    min_size = w.meta["min_size"][0]
    if image_size is not None and image_size < min_size:
        raise WeightsError(f"{name}'s ImageNet layout needs images of at least {min_size} px (got "
                           f"{image_size}): pass --image-size {w.transforms().crop_size[0]} (the size "
                           f"the weights were trained at) or at least {min_size}")
    hub, file = os.path.join(torch.hub.get_dir(), "checkpoints"), os.path.basename(urlparse(w.url).path)
    path = os.path.join(hub, file)
    try:  # no network needed when the file is cached; a download is checked against its hash
        state = torch.hub.load_state_dict_from_url(w.url, model_dir=hub, map_location="cpu",
                                                   progress=sys.stderr.isatty(), check_hash=True,
                                                   weights_only=True)
    except Exception as e:
        reason = str(getattr(e, "reason", e)).strip()
        reason = reason.splitlines()[0][:200] if reason else type(e).__name__
        if os.path.exists(path):
            raise WeightsError(f"cannot read {path} ({reason}); delete it to download it again") from None
        raise WeightsError(f"{w} is not in the torch hub cache and could not be downloaded ({reason}): "
                           f"put {file} (from {w.url}) at {path} ($TORCH_HOME/hub/checkpoints/"
                           f"{file})") from None
    t = w.transforms()
    # torchvision turns on transform_input with GoogLeNet's weights: inside the model the ImageNet-
    # normalized input becomes (x - 0.5) / 0.5, i.e. mean = std = 0.5 outside (no extra layer here).
    mean, std = ([0.5] * 3, [0.5] * 3) if name == "googlenet" else (list(t.mean), list(t.std))
    return state, {"source": "torchvision", "weights": str(w), "mean": mean, "std": std,
                   "image_size": t.crop_size[0]}


def for_channels(values, channels):
    """Per-channel mean or std for `channels`: 1 channel gets the average of RGB's (the summed
    first conv then sees a gray image as its RGB copy), 3 channels repeat a gray value."""
    values = [float(v) for v in values]
    return [sum(values) / len(values)] if channels < len(values) else values * (channels // len(values))


def head_names(model):
    """Module names of the classifier: the last conv/linear layer (every family registers its
    classifier last) and GoogLeNet's auxiliary output layers."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return [layers[-1]] + [f"{n}.fc2" for n, m in model.named_modules() if isinstance(m, InceptionAux)]


def _is_head(key, heads):
    return any(key.startswith(h + ".") for h in heads)


def load_transfer(model, state_dict, new_head=True):
    """Load what fits of `state_dict` into `model`; returns one summary line, WeightsError when nothing
    fits. A 1-channel model gets a 3-channel first conv summed over RGB (a gray image then gives the
    features of its RGB copy). The head stays new when new_head (ImageNet's 1000 classes are not the
    dataset's) or its shape differs; other shape mismatches and non-finite tensors are skipped, named."""
    own, state, heads, notes = model.state_dict(), dict(state_dict), head_names(model), []
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)) + ".weight"
    w = state.get(first)
    if (w is not None and w.ndim == 4 and own[first].shape[1] == 1 and w.shape[1] == 3
            and w.shape[0] == own[first].shape[0] and w.shape[2:] == own[first].shape[2:]):
        state[first] = w.sum(1, keepdim=True)
        notes.append(f"{first} summed over RGB for 1 channel")
    loaded, mismatched, unused, nonfinite = {}, [], [], []
    for k, v in state.items():
        if k not in own:
            unused.append(k)
        elif _is_head(k, heads) and (new_head or v.shape != own[k].shape):
            continue  # stays newly initialised
        elif v.shape != own[k].shape:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
        elif v.is_floating_point() and not torch.isfinite(v).all():
            nonfinite.append(k)
        else:
            loaded[k] = v
    body = [k for k in own if not _is_head(k, heads)]
    if not any(k in loaded for k in body):
        raise WeightsError(f"none of the given weights fit this model ({len(state)} tensors, e.g. "
                           f"{', '.join(list(state)[:3]) or 'none'})")
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in body if k not in state]  # absent from the weights (not skipped ones)
    line = f"loaded {len(loaded)} of {len(own)} tensors"
    if any(k not in loaded for k in own if _is_head(k, heads)):
        line += f"; new head: {', '.join(heads)}"
    for what, keys in (("left at init (not in the weights)", missing), ("shape mismatches", mismatched),
                       ("non-finite", nonfinite), ("unused", unused)):
        if keys:
            line += f"; {len(keys)} {what}: {', '.join(keys[:3])}{', ...' * (len(keys) > 3)}"
    return line + "".join(f"; {n}" for n in notes)


class _EvalBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that train() cannot take out of eval mode: running statistics used, never updated."""

    def train(self, mode=True):
        return super().train(False)


def freeze_backbone(model):
    """Train only the head (head_names), a linear probe on fixed features: the backbone's parameters
    and BatchNorm statistics stay as they are. Returns the names of the trainable parameters."""
    heads = head_names(model)
    for n, p in model.named_parameters():
        p.requires_grad_(_is_head(n, heads))
    for n, m in model.named_modules():
        if type(m) is nn.BatchNorm2d and not _is_head(n + ".", heads):
            m.__class__ = _EvalBatchNorm2d
            m.eval()
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- the run dir
# A run dir holds one run: last.pt, best.pt and the files beside them; train.py keeps it locked.

LOCK_NAME = ".lock"
_IN_USE = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, getattr(errno, "EDEADLOCK", errno.EDEADLK)}


def lock_run_dir(out):
    """The run dir's lock (fcntl or msvcrt) as an open file, held until closed or the process ends:
    a second train.py on the same --out fails at once."""
    f = open(Path(out) / LOCK_NAME, "a+")
    try:
        try:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows
            import msvcrt
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except (ImportError, OSError) as e:  # in use; else neither module or no locks here (ENOLCK): none
        if getattr(e, "errno", None) in _IN_USE:
            f.close()
            raise ValueError(f"{out} is in use by another train.py run (it holds the lock on "
                             f"{Path(out) / LOCK_NAME}); wait for it to end or pick another --out") from None
    return f


def claim_run_dir(out, resume_path):
    """A fresh start never writes over a run; a resume writes only into its own run's folder."""
    last = Path(out) / "last.pt"
    if not last.exists():
        return
    if resume_path is None:
        raise ValueError(f"{out} already holds a run (last.pt); use --resume {last} or another --out")
    if not os.path.samefile(Path(resume_path).resolve().parent, out):
        raise ValueError(f"{out} already holds another run (last.pt); resume that one with --resume {last}, "
                         f"or continue {resume_path} in its own folder or an empty --out")


def best_epoch(history):
    """The epoch best.pt holds: the first with the best validation top-1, else the last epoch."""
    rows = [r for r in history if r.get("val_acc") is not None]
    if rows:
        return max(rows, key=lambda r: r["val_acc"])["epoch"]
    return history[-1]["epoch"] if history else None


def repair_best(out, ck, resume_path):
    """A kill between writing last.pt and best.pt leaves best.pt an epoch behind; resuming puts
    the best epoch back in best.pt when the checkpoint resumed from is that epoch."""
    epoch, best, last = ck["epoch"], Path(out) / "best.pt", Path(out) / "last.pt"
    if best_epoch(ck["history"]) != epoch:
        return
    try:
        if torch.load(best, map_location="cpu", weights_only=True, mmap=True)["epoch"] == epoch:
            return
    except Exception:  # missing or unreadable: write it
        pass
    if last.exists() and os.path.samefile(resume_path, last):
        link(last, best)
    else:
        save(ck, best)
    print(f"best.pt now holds epoch {epoch}, the best epoch (it was missing or older)", flush=True)
