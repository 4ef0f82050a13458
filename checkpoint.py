"""The checkpoint format: one dict, made, written atomically, loaded and checked here only.

    import checkpoint
    ck = checkpoint.load_checkpoint("runs/demo/best.pt")     # weights_only load + every field checked
    model = checkpoint.model_from_checkpoint(ck)              # rebuilt from the file alone, eval mode

A checkpoint is a dict that torch.load(path, weights_only=True) reads, with the fields of SCHEMA
(docs/training.md). train.py makes it with make_checkpoint() and writes it with save(); link()
puts a second name on a saved file (best.pt beside last.pt) without writing it again. The run
dir's lock and the best.pt repair of a resume live here too.
"""
import errno
import math
import os
import pickle
import re
import shutil
from numbers import Real
from pathlib import Path

import torch

from models import MODELS, build_model
from runtime import one_line, replacing

FORMAT = "deeper-networks/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe, not ours or malformed (one line)."""


def _int(lo):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"an integer >= {lo}"


def _state(v):
    return isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(t) for k, t in v.items())


def _reals(positive):
    return lambda v: isinstance(v, (list, tuple)) and v and all(
        isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive) for x in v)


def _or_none(check):
    return lambda v: v is None or check(v)


# field -> (check, what it must be). Optional fields may be None (a weights-only checkpoint);
# the cross-field rules (classes and mean/std lengths) are in check_fields.
SCHEMA = {
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "model_name": (lambda v: v in MODELS, "a model name of models.MODELS"),
    "model_options": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a dict of options"),
    "num_classes": _int(1), "in_channels": _int(1), "image_size": _int(1),
    "model": (_state, "a state_dict (names -> tensors)"),
    "classes": (_or_none(lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v)),
                "None or a list of class names (strings)"),
    "mean": (_or_none(_reals(False)), "None or a list of finite numbers"),
    "std": (_or_none(_reals(True)), "None or a list of numbers > 0"),
    "args": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a dict of training arguments"),
    "epoch": _int(0),
    "ema": (_or_none(_state), "None or a state_dict"),
    "optimizer": (_or_none(lambda v: isinstance(v, dict)), "None or an optimizer state dict"),
    "scheduler": (_or_none(lambda v: isinstance(v, dict)), "None or a scheduler state dict"),
    "scaler": (_or_none(lambda v: isinstance(v, dict)), "None or a GradScaler state dict"),
    "rng": (_or_none(lambda v: isinstance(v, dict) and torch.is_tensor(v.get("torch"))),
            "None or a dict with the torch RNG state"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of per-epoch rows (dicts)"),
    "init": (_or_none(lambda v: isinstance(v, dict)), "None or a dict"),
}
REQUIRED = ("format", "model_name", "model_options", "num_classes", "in_channels", "image_size", "model")
# Without these a checkpoint holds weights only: it cannot continue a run.
RESUME_KEYS = ("args", "epoch", "optimizer", "scheduler", "scaler", "rng", "history")


def _show(v):
    s = repr(v) if isinstance(v, (str, int, float, bool, type(None))) else type(v).__name__
    return s if len(s) <= 60 else s[:57] + "..."


def check_fields(ck, path):
    """Every field's type and shape, once, where a checkpoint is loaded: CheckpointError
    "CKPT: <field> is <what>, expected <what>" for the first that is wrong. Optional fields that
    are absent count as None (args {} and history [] where absent)."""
    missing = [k for k in REQUIRED if k not in ck]
    if missing:
        raise CheckpointError(f"{path} is not a deeper-networks checkpoint (missing: {', '.join(missing)})")
    if ck["format"] != FORMAT:
        raise CheckpointError(f"{path} is not a deeper-networks checkpoint: its format is {_show(ck['format'])}, "
                              f"this program reads {FORMAT!r}")
    ck = {**dict.fromkeys(SCHEMA), "args": {}, "history": [], **ck}
    for key, (ok, expected) in SCHEMA.items():
        if not ok(ck[key]):
            raise CheckpointError(f"{path}: {key} is {_show(ck[key])}, expected {expected}")
    for key, n in (("classes", ck["num_classes"]), ("mean", ck["in_channels"]), ("std", ck["in_channels"])):
        if ck[key] is not None and len(ck[key]) != n:
            raise CheckpointError(f"{path}: {key} has {len(ck[key])} entries, expected {n} "
                                  f"({'num_classes' if key == 'classes' else 'in_channels'})")
    return ck


def make_checkpoint(*, model_name, model_options, num_classes, in_channels, image_size, model,
                    classes=None, mean=None, std=None, args=None, epoch=0, ema=None, optimizer=None,
                    scheduler=None, scaler=None, rng=None, history=None, init=None):
    """The checkpoint dict. `model` / `ema`: state_dicts of the unwrapped module (no `module.` or
    `_orig_mod.` prefixes)."""
    return {"format": FORMAT, "model_name": model_name, "model_options": dict(model_options),
            "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
            "classes": [str(c) for c in classes] if classes is not None else None,
            "mean": [float(m) for m in mean] if mean is not None else None,
            "std": [float(s) for s in std] if std is not None else None,
            "args": dict(args or {}), "epoch": epoch, "model": model, "ema": ema, "optimizer": optimizer,
            "scheduler": scheduler, "scaler": scaler, "rng": rng, "history": list(history or []), "init": init}


def save(ck, path):
    """Write atomically: a kill or a full disk never leaves half a file in place of a good one."""
    # Through a Python file: a full disk then surfaces as OSError(ENOSPC) from its write(); given a
    # path, torch writes through its own stream and reports only "unexpected pos N vs M".
    with replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(ck, f)


def link(src, dst):
    """Give the saved file `src` the name `dst` too, atomically (a hard link, or a copy where the
    file system has none). save() replaces files, never edits them, so the names stay independent."""
    with replacing(dst) as tmp:
        try:
            os.remove(tmp)  # a stale temp file from a killed run: os.link will not overwrite it
        except FileNotFoundError:
            pass
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise
            shutil.copyfile(src, tmp)  # no hard links here (FAT, some network file systems)


# What torch's weights_only unpickler says when a file asks for code or objects (torch <= 2.x:
# "Unsupported global: GLOBAL x.y was not an allowed global"; torch 2.14: "... whose module posix
# is blocked"), or a refused call.
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
        reason = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(e))
        raise CheckpointError(f"cannot read checkpoint {path}: "
                              + (f"not a torch.save file ({reason[1].strip()})" if reason else one_line(e, 200))) from None
    except EOFError:
        raise CheckpointError(f"cannot read checkpoint {path}: empty or truncated file") from None
    except Exception as e:  # RuntimeError (bad zip), OSError (a directory), ...
        raise CheckpointError(f"cannot read checkpoint {path}: {one_line(str(e).split('. ')[0], 200)}") from None


def load_checkpoint(path):
    """A deeper-networks checkpoint, loaded with weights_only=True and checked field by field."""
    ck = load_file(path)
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path} is not a deeper-networks checkpoint (a {type(ck).__name__}, not a dict)")
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


def load_init(path):
    """(state_dict, init) to start a run from (--init-from): one of our checkpoints (its weights and
    the mean/std they were trained with) or a plain state_dict file, e.g. torchvision's .pth (DDP
    and torch.compile prefixes dropped). init records the source for the new checkpoint."""
    ck = load_file(path)
    if isinstance(ck, dict) and ck.get("format") == FORMAT:
        ck = check_fields(ck, path)
        return ck["model"], {"source": str(path), "model_name": ck["model_name"], "mean": ck["mean"],
                             "std": ck["std"], **({"init": ck["init"]} if ck["init"] else {})}
    if isinstance(ck, dict) and ck and all(isinstance(k, str) and torch.is_tensor(v) for k, v in ck.items()):
        return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in ck.items()}, {"source": str(path)}
    raise CheckpointError(f"{path} is neither a deeper-networks checkpoint nor a state_dict (a dict of tensors)")


# ----------------------------------------------------------------------------- the run dir
# A run dir holds one run: last.pt, best.pt and the files beside them; train.py keeps it locked.

LOCK_NAME = ".lock"
_IN_USE = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, getattr(errno, "EDEADLOCK", errno.EDEADLK)}


def lock_run_dir(out):
    """An exclusive lock on the run dir for the run's lifetime: returns the open lock file (closing
    it, or the process ending, releases it); a second train.py on the same --out fails at once.
    fcntl.flock where it exists, msvcrt.locking on Windows, no lock where neither works."""
    f = open(Path(out) / LOCK_NAME, "a+")
    try:
        try:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            try:
                import msvcrt
            except ImportError:
                return f
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError as e:
        if e.errno not in _IN_USE:
            return f  # a file system without locks (ENOLCK): run without one
        f.close()
        raise ValueError(f"{out} is in use by another train.py run (it holds the lock on {Path(out) / LOCK_NAME}); "
                         "wait for it to end or pick another --out") from None
    except BaseException:
        f.close()
        raise
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
    """The epoch best.pt holds: the first with the best validation top-1; without a validation
    split, the last epoch."""
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
