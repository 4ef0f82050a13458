"""The checkpoint format: one dict, built, saved, loaded and checked here and nowhere else.

    import checkpoint
    ck = checkpoint.load_checkpoint("runs/demo/best.pt")     # torch.load(weights_only=True) + checks
    model = checkpoint.model_from_checkpoint(ck)              # rebuilt from the file alone, eval mode

A checkpoint is a dict that torch.load(path, weights_only=True) reads, with the keys of KEYS
(README, "Checkpoints"). train.py builds it with make_checkpoint() and writes it with save()
(temp file + rename: a kill or a full disk never leaves half a file in place of a good one);
link() puts a second name on a saved file (best.pt beside last.pt) without writing it again.
"""
import errno
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from models import build_model, upgrade_state_dict

FORMAT = "deeper-networks/1"
REQUIRED_KEYS = ("format", "model_name", "model_options", "num_classes", "in_channels", "image_size", "model")
KEYS = REQUIRED_KEYS + ("classes", "mean", "std", "args", "epoch", "ema", "optimizer", "scheduler",
                        "scaler", "rng", "history")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or not ours (one-line message)."""


def make_checkpoint(*, model_name, model_options, num_classes, in_channels, image_size, model,
                    classes=None, mean=None, std=None, args=None, epoch=0, ema=None, optimizer=None,
                    scheduler=None, scaler=None, rng=None, history=None, **extra):
    """The checkpoint dict. `model` / `ema`: state_dicts of the unwrapped module (no `module.` or
    `_orig_mod.` prefixes). Extra keys (e.g. `init_from`) are kept as given."""
    return {"format": FORMAT, "model_name": model_name, "model_options": dict(model_options),
            "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
            "classes": list(classes) if classes is not None else None,
            "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
            "args": dict(args or {}), "epoch": epoch, "model": model, "ema": ema, "optimizer": optimizer,
            "scheduler": scheduler, "scaler": scaler, "rng": rng, "history": list(history or []), **extra}


@contextmanager
def replacing(path):
    """Yields a temp path beside `path` to write (same suffix, for matplotlib); renamed over `path`
    when the block succeeds. On any failure (Ctrl-C included) the temp file is removed and the
    previous file at `path` stays as it was; a full disk raises OSError(ENOSPC) with one line
    naming the folder. Every file this repo's runs write goes through it."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if _no_space(e):
            raise OSError(errno.ENOSPC, f"no space left on the disk of {path.parent.resolve()} while "
                          f"writing {path.name} (the previous {path.name}, if any, is kept)") from None
        raise


def save(ck, path):
    """Write atomically (replacing): a kill or a full disk never leaves half a file in its place."""
    # Through a Python file: a full disk then surfaces as OSError(ENOSPC) from its write(). Given
    # a path, torch writes through its own stream and reports only "unexpected pos N vs M".
    with replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(ck, f)


def link(src, dst):
    """Give the saved file `src` the name `dst` too, atomically (a hard link, or a copy where the
    file system has none): the previous `dst` stays until the new one is complete. Files written
    by save() are replaced, never modified in place, so the two names never change each other."""
    with replacing(dst) as tmp:
        try:
            os.remove(tmp)  # a stale temp file from a killed run: os.link will not overwrite it
        except FileNotFoundError:
            pass
        try:
            os.link(src, tmp)
        except OSError as e:
            if _no_space(e):
                raise
            shutil.copyfile(src, tmp)  # no hard links here (FAT, some network file systems)


def _no_space(e):
    """A full disk (or quota), however torch wrapped it: OSError(ENOSPC) from a Python file, or a
    RuntimeError ('file write failed') from torch's own writer."""
    full = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    while e is not None:
        if isinstance(e, OSError) and e.errno in full:
            return True
        if "No space left" in str(e) or "file write failed" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


# What torch's weights_only unpickler says when a file asks for code or objects: "Unsupported
# global: GLOBAL x.y was not an allowed global" (torch <= 2.x), "Trying to load unsupported GLOBAL
# posix.system whose module posix is blocked" (torch 2.14, blocklisted modules), or a refused call.
_BLOCKED = re.compile(r"unsupported global|whose module \S+ is blocked|call reduce for unrecognized "
                      r"function|can only (?:create new object|build)", re.IGNORECASE)


def _reason(e):
    """One short line out of torch.load's multi-paragraph errors."""
    if isinstance(e, EOFError):
        return "empty or truncated file"
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(e))  # a non-zip, non-pickle file
    if found:
        return f"not a torch.save file ({found.group(1).strip()})"
    return str(e).strip().split("\n")[0].split(". ")[0][:200] or type(e).__name__


def load_checkpoint(path, map_location="cpu", required=REQUIRED_KEYS):
    """torch.load(weights_only=True) of a deeper-networks checkpoint; CheckpointError otherwise.
    required=(): any weights-only file (load_init tells the kinds apart)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if _BLOCKED.search(str(e)):
            raise CheckpointError(f"refusing to load {path}: it contains pickled code/objects that are "
                                  "not plain weights (loaded with weights_only=True)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {_reason(e)}") from None
    except Exception as e:  # RuntimeError (bad zip), EOFError (empty), OSError (a directory), ...
        raise CheckpointError(f"cannot read checkpoint {path}: {_reason(e)}") from None
    missing = [k for k in required if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise CheckpointError(f"{path} is not a deeper-networks checkpoint (missing: {', '.join(missing)})")
    if isinstance(ck, dict) and "format" in ck and ck["format"] != FORMAT:
        raise CheckpointError(f"{path} is not a deeper-networks checkpoint: its format is "
                              f"{str(ck['format'])[:80]!r}, this program reads {FORMAT!r}")
    return ck


def model_from_checkpoint(ck, ema=False):
    """The checkpoint's model (its EMA weights if ema and present), in eval mode, on the CPU."""
    model = build_model(ck["model_name"], ck["num_classes"], ck["in_channels"], ck["image_size"],
                        **ck["model_options"])
    state = ck["ema"] if ema and ck.get("ema") else ck["model"]
    load_weights(model, upgrade_state_dict(ck["model_name"], state), ck["model_name"])  # pre-rename names mapped
    return model.eval()


def load_weights(model, state, model_name, what="checkpoint weights"):
    """model.load_state_dict(state), or a CheckpointError naming the first mismatch (torch's
    message opens with 'Error(s) in loading state_dict for X:' and lists them on the next lines)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"{what} do not fit {model_name}: {detail[:300]}") from None


def load_init(path):
    """(state_dict, init) to start a run from (train.py --init-from): one of our checkpoints (its
    model's weights, old names mapped, and the mean/std they were trained with) or a plain
    state_dict file, e.g. torchvision's own .pth (no mean/std: the dataset's are used). init
    records the source for the new checkpoint. CheckpointError for anything else."""
    ck = load_checkpoint(path, required=())
    if isinstance(ck, dict) and "format" in ck and "model_name" in ck and isinstance(ck.get("model"), dict):
        return upgrade_state_dict(ck["model_name"], ck["model"]), {
            "source": str(path), "model_name": ck["model_name"], "mean": ck.get("mean"), "std": ck.get("std"),
            **({"init": ck["init"]} if ck.get("init") else {})}  # where the source itself started
    if isinstance(ck, dict) and ck and all(isinstance(v, torch.Tensor) for v in ck.values()):
        # DDP / torch.compile prefixes from other people's training scripts
        return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in ck.items()}, {"source": str(path)}
    raise CheckpointError(f"{path} is neither a deeper-networks checkpoint nor a state_dict (a dict of tensors)")


# ----------------------------------------------------------------------------- the run dir
# A run dir holds one run: last.pt, best.pt and the files beside them; train.py keeps it locked.

LOCK_NAME = ".lock"
_IN_USE = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, getattr(errno, "EDEADLOCK", errno.EDEADLK)}


def lock_run_dir(out):
    """An exclusive lock on the run dir for the run's lifetime: returns the open lock file (closing
    it, or the process ending, releases the lock). A second train.py on the same --out fails at
    once. fcntl.flock where it exists, msvcrt.locking on Windows, no lock where neither works."""
    f = open(out / LOCK_NAME, "a+")
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
        raise ValueError(f"{out} is in use by another train.py run (it holds the lock on "
                         f"{out / LOCK_NAME}); wait for it to end or pick another --out") from None
    except BaseException:
        f.close()
        raise
    return f


def claim_run_dir(out, resume_path):
    """A fresh start never writes over a run; a resume writes only into its own run's folder."""
    last = out / "last.pt"
    if not last.exists():
        return
    if resume_path is None:
        raise ValueError(f"{out} already holds a run (last.pt); use --resume {last} or another --out")
    if not os.path.samefile(Path(resume_path).resolve().parent, out):
        raise ValueError(f"{out} already holds another run (last.pt); resume that one with --resume {last}, "
                         f"or continue {resume_path} in its own folder or an empty --out")


def best_epoch(history):
    """The epoch best.pt holds by the selection rule: the first epoch with the best validation
    top-1; with no validation split, the last epoch."""
    rows = [r for r in history if r.get("val_acc") is not None]
    if rows:
        return max(rows, key=lambda r: r["val_acc"])["epoch"]
    return history[-1]["epoch"] if history else None


def repair_best(out, ck, resume_path):
    """A kill between writing last.pt and best.pt leaves best.pt an epoch behind; resuming puts
    the best epoch back in best.pt when the checkpoint resumed from is that epoch."""
    epoch, best = ck["epoch"], out / "best.pt"
    if best_epoch(ck["history"]) != epoch:
        return
    try:
        if torch.load(best, map_location="cpu", weights_only=True, mmap=True)["epoch"] == epoch:
            return
    except Exception:  # missing or unreadable: write it
        pass
    last = out / "last.pt"
    if last.exists() and os.path.samefile(resume_path, last):
        link(last, best)
    else:
        save(ck, best)
    print(f"best.pt now holds epoch {epoch}, the best epoch (it was missing or older)", flush=True)
