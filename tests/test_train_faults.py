"""train.py and checkpoint.py under faults and bad input: divergence, kills, full disks, two runs
on one folder, resumes that do not fit, out-of-range flags. In-process (train.cli / train.main)
on tiny data; every test names the defect it guards against."""
import errno
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import checkpoint
import models
import runtime
import train

# lenet5 needs 12 px; 64 train images in batches of 32: two steps per epoch.
TINY = ["--dataset", "synthetic", "--limit-train", "64", "--limit-test", "32", "--batch-size", "32"]
LENET = ["--model", "lenet5", *TINY, "--image-size", "12"]


def cli(capsys, *argv):
    """train.py's command line in-process: (exit status, stdout, stderr)."""
    try:
        rc = train.cli([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err, prefix="error: "):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def load(path):
    return torch.load(path, weights_only=True)


def all_finite(ck):
    tensors = [t for key in ("model", "ema") for t in (ck.get(key) or {}).values() if t.is_floating_point()]
    return all(torch.isfinite(t).all() for t in tensors)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    """One finished epoch of lenet5 (seed 3), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("run1") / "run"
    assert train.cli([*LENET, "--epochs", "1", "--seed", "3", "--out", str(out)]) == 0
    return out


def copy_run(run1, dest):
    shutil.copytree(run1, dest)
    return dest


# ----------------------------------------------------------------------------- divergence

def test_divergence_with_a_finite_loss_stops_and_saves_nothing_non_finite(tmp_path, capsys):
    """lr 1e6 on a BatchNorm net: the loss stays finite while BatchNorm statistics blow up.
    Before: exit 0, 100% reported, thousands of non-finite buffers in both checkpoints."""
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "--model", "resnet20", *TINY, "--image-size", "8", "--lr", "1e6",
                     "--epochs", "2", "--out", out)
    assert rc == 1
    line = one_error_line(err)
    assert "non-finite" in line and "learning rate" in line
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            assert all_finite(load(out / name)), name
    assert not out.exists() or leftovers(out) == []


def test_update_of_an_epochs_last_step_is_checked_before_saving(tmp_path, capsys, monkeypatch):
    """Epoch 2's last step gets a NaN learning rate: its loss (computed before the update) is
    finite, the weights after it are not. Before: epoch 2 was saved with NaN weights, and the
    stop in epoch 3 kept that as the 'last good' checkpoint."""
    factor = train.Schedule.factor
    monkeypatch.setattr(train.Schedule, "factor",
                        lambda self, it: math.nan if it == 2 * self.ipe - 1 else factor(self, it))
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *LENET, "--epochs", "3", "--ema", "0.5", "--out", out)
    assert rc == 1
    line = one_error_line(err)
    assert "non-finite" in line and "epoch 2" in line
    for name in ("last.pt", "best.pt"):
        ck = load(out / name)
        assert ck["epoch"] == 1 and all_finite(ck), name


# ----------------------------------------------------------------------------- kills, Ctrl-C

def test_kill_between_last_and_best_is_repaired_on_resume(tmp_path, capsys, monkeypatch):
    """Ctrl-C after last.pt (epoch 2) is written, before best.pt is. Before: best.pt stayed at
    epoch 1 for good, since the resumed history already held epoch 2."""
    link = checkpoint.link

    def interrupted_link(src, dst):
        if load(src)["epoch"] == 2:
            raise KeyboardInterrupt
        link(src, dst)
    monkeypatch.setattr(checkpoint, "link", interrupted_link)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *LENET, "--epochs", "2", "--out", out)
    assert rc == 130
    assert one_error_line(err, "interrupted") == \
        f"interrupted at epoch 2; resume with: python train.py --resume {out / 'last.pt'}"
    assert (load(out / "last.pt")["epoch"], load(out / "best.pt")["epoch"]) == (2, 1)
    assert leftovers(out) == []

    monkeypatch.setattr(checkpoint, "link", link)
    rc, stdout, err = cli(capsys, "--resume", out / "last.pt")  # nothing left to train: refused
    assert rc == 1 and "already finished 2 epochs" in one_error_line(err)
    assert "best.pt now holds epoch 2" in stdout
    best, last = load(out / "best.pt"), load(out / "last.pt")
    assert best["epoch"] == 2
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())


def test_ctrl_c_while_saving_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of writing epoch 2's checkpoint: exit 130, one line with the resume
    command, epoch 1 intact, no .tmp left; the printed command resumes the run."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt
        real_save(obj, f, *args, **kw)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *LENET, "--epochs", "2", "--out", out)
    assert rc == 130
    line = one_error_line(err, "interrupted")
    assert line == f"interrupted at epoch 2; resume with: python train.py --resume {out / 'last.pt'}"
    assert load(out / "last.pt")["epoch"] == 1 and leftovers(out) == []
    monkeypatch.setattr(torch, "save", real_save)
    rc, _, err = cli(capsys, *line.split("python train.py ")[1].split())
    assert rc == 0, err
    assert load(out / "last.pt")["epoch"] == 2


# ----------------------------------------------------------------------------- full disk

def test_full_disk_one_line_previous_checkpoint_kept(tmp_path, capsys, monkeypatch):
    """The second checkpoint hits a full disk (the OSError a real ENOSPC gives, from /dev/full
    where there is one). Before: torch's writer said only "unexpected pos N vs M" (chained
    traceback) and a partial .tmp stayed behind."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kw):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kw)
        f.write(b"PK\x03\x04 what fitted")
        if os.path.exists("/dev/full"):
            with open("/dev/full", "wb") as full:
                real_save(obj, full)  # raises torch's own error for a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *LENET, "--epochs", "2", "--out", out)
    assert rc == 1
    line = one_error_line(err)
    assert "no space left" in line and "last.pt" in line and str(out.resolve()) in line
    monkeypatch.setattr(torch, "save", real_save)
    ck = load(out / "last.pt")
    assert ck["epoch"] == 1 and all_finite(ck)
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- one run per folder

def test_second_run_on_a_locked_run_dir_is_refused(tmp_path, capsys):
    """Another process holds the run dir (as a running train.py does). Before: both runs wrote
    into it; the existing-run check only looked for last.pt at start."""
    pytest.importorskip("fcntl")
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f.fileno(), fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
         str(out / checkpoint.LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = cli(capsys, *LENET, "--epochs", "1", "--out", out)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 1 and "in use by another train.py run" in one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == [checkpoint.LOCK_NAME]  # nothing written
    rc, _, err = cli(capsys, *LENET, "--epochs", "1", "--out", out)  # free again
    assert rc == 0, err


def test_run_dir_lock_is_portable(tmp_path, monkeypatch):
    """No fcntl (Windows): msvcrt.locking; neither: no lock, no crash."""
    monkeypatch.setitem(sys.modules, "fcntl", None)
    held = set()

    def locking(fd, mode, n):
        key = os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists("/proc/self/fd") else fd
        if key in held:
            raise OSError(errno.EACCES, "Permission denied")
        held.add(key)
    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(locking=locking, LK_NBLCK=2))
    first = checkpoint.lock_run_dir(tmp_path)
    with pytest.raises(ValueError, match="in use by another train.py run"):
        checkpoint.lock_run_dir(tmp_path)
    first.close()
    monkeypatch.setitem(sys.modules, "msvcrt", None)
    checkpoint.lock_run_dir(tmp_path).close()
    checkpoint.lock_run_dir(tmp_path).close()


def test_resume_into_another_runs_folder_is_refused(run1, tmp_path, capsys):
    """--resume A/last.pt --out B, B holding another run. Before: B was overwritten silently."""
    a = copy_run(run1, tmp_path / "a")
    b = copy_run(run1, tmp_path / "b")
    before = (b / "last.pt").read_bytes()
    rc, _, err = cli(capsys, "--resume", a / "last.pt", "--out", b, "--epochs", "2")
    assert rc == 1
    line = one_error_line(err)
    assert "already holds another run" in line and str(b / "last.pt") in line
    assert (b / "last.pt").read_bytes() == before


# ----------------------------------------------------------------------------- resume

def test_resume_names_every_flag_it_does_not_apply(run1, tmp_path, capsys):
    """Before: --lr, --batch-size, --model on a resume were ignored without a word. --seed 0 is
    the parser's default but not the run's (3): given on the command line, it is named too."""
    run = copy_run(run1, tmp_path / "run")
    rc, _, err = cli(capsys, "--resume", run / "last.pt", "--epochs", "2", "--lr", "0.5",
                     "--batch-size", "16", "--model", "resnet20", "--seed", "0", "--limit-test", "32",
                     "--workers", "0")
    assert rc == 0, err
    line = one_error_line(err, "warning: ")
    for named in ("--lr 0.5 (checkpoint: 0.1)", "--batch-size 16 (checkpoint: 32)",
                  "--model resnet20 (checkpoint: lenet5)", "--seed 0 (checkpoint: 3)"):
        assert named in line
    assert "--limit-test 32 (" not in line and "--workers 0 (" not in line and "--epochs 2 (" not in line
    ck = load(run / "last.pt")
    assert ck["epoch"] == 2 and ck["model_name"] == "lenet5"
    assert (ck["args"]["lr"], ck["args"]["batch_size"], ck["args"]["seed"]) == (0.1, 32, 3)


def test_resume_refuses_weights_only_checkpoints(run1, tmp_path, capsys):
    ck = load(run1 / "last.pt")
    for drop in ("optimizer", "rng"):
        path = tmp_path / f"no-{drop}.pt"
        checkpoint.save({**ck, drop: None}, path)
        rc, _, err = cli(capsys, "--resume", path, "--epochs", "2", "--out", tmp_path / drop)
        assert rc == 1
        line = one_error_line(err)
        assert "weights-only checkpoint" in line and drop in line and "evaluate.py" in line
    weights = checkpoint.make_checkpoint(model_name="lenet5", model_options={}, num_classes=10,
                                         in_channels=3, image_size=12, model=ck["model"])
    checkpoint.save(weights, tmp_path / "weights.pt")
    rc, _, err = cli(capsys, "--resume", tmp_path / "weights.pt", "--out", tmp_path / "w")
    assert rc == 1 and "weights-only checkpoint" in one_error_line(err)


def test_resume_refuses_weights_that_do_not_fit(run1, tmp_path, capsys):
    ck = load(run1 / "last.pt")
    model = dict(ck["model"])
    key = next(k for k, v in model.items() if v.ndim == 4)
    model[key] = model[key][:, :1]  # one input channel where the model has three
    checkpoint.save({**ck, "model": model}, tmp_path / "bad.pt")
    rc, _, err = cli(capsys, "--resume", tmp_path / "bad.pt", "--epochs", "2", "--out", tmp_path / "x")
    assert rc == 1
    assert "weights do not fit lenet5" in one_error_line(err) and key in err
    assert not (tmp_path / "x").exists()


def test_resume_refuses_data_with_other_classes(tmp_path, capsys):
    from test_data import write_folder
    write_folder(tmp_path / "three", n_train=8, n_test=2, size=(12, 12))
    write_folder(tmp_path / "two", classes=("cat", "dog"), n_train=8, n_test=2, size=(12, 12))
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "--model", "lenet5", "--dataset", "folder", "--data-dir", tmp_path / "three",
                     "--batch-size", "8", "--epochs", "1", "--out", out)
    assert rc == 0, err
    rc, _, err = cli(capsys, "--resume", out / "last.pt", "--epochs", "2", "--data-dir", tmp_path / "two")
    assert rc == 1
    line = one_error_line(err)
    assert "num_classes 3" in line and "the data 2" in line
    assert load(out / "last.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- usage

F32 = "3.40282e+38"  # float32's largest: larger factors overflow inside the optimizer (issue 27)
BAD_NUMBERS = [
    ("--ema", "2", "[0, 1)"), ("--ema", "-0.5", "[0, 1)"), ("--ema", "1", "[0, 1)"),
    ("--mixup", "-1", "[0, 1e+06]"), ("--cutmix", "-1", "[0, 1e+06]"), ("--weight-decay", "-1", f"[0, {F32}]"),
    ("--gamma", "-1", "(0, 1]"), ("--gamma", "0", "(0, 1]"), ("--gamma", "1e9", "(0, 1]"),
    ("--lr", "nan", f"(0, {F32}]"), ("--lr", "inf", f"(0, {F32}]"), ("--lr", "0", f"(0, {F32}]"),
    ("--lr", "-0.1", f"(0, {F32}]"), ("--momentum", "1", "[0, 1)"), ("--seed", "-1", "[0, 4294967295]"),
    ("--seed", "1.5", "an integer"), ("--label-smoothing", "1.5", "[0, 1)"), ("--step-size", "0", "[1, 1000000000]"),
    ("--patience", "-1", "[0, 1000000]"), ("--warmup-epochs", "-1", "[0, 1e+06]"), ("--warmup-epochs", "inf", "[0, 1e+06]"),
    ("--epochs", "0", "[1, 1000000]"), ("--batch-size", "0", "[1, 1000000000]"), ("--val-split", "1", "[0, 1)"),
    ("--val-split", "-0.1", "[0, 1)"), ("--limit-train", "0", "[1, 1000000000]"), ("--limit-test", "-5", "[1, 1000000000]"),
    ("--cutout", "-1", "[0, 4096]"), ("--clip-grad", "-1", f"[0, {F32}]"), ("--clip-grad", "nan", f"[0, {F32}]"),
    ("--workers", "-1", "[0, 256]"), ("--dropout", "1", "[0, 1)"), ("--image-size", "0", "[1, 1000000000]"),
    ("--milestones", "0", "[1, 1000000000]"),
    # values in the old ranges that no run can use (issue 27): an overflow inside SGD, a hang before step 1
    ("--lr", "1e308", f"(0, {F32}]"), ("--weight-decay", "1e308", f"[0, {F32}]"), ("--clip-grad", "1e308", f"[0, {F32}]"),
    ("--epochs", "99999999999999999999999", "[1, 1000000]"), ("--warmup-epochs", "1e308", "[0, 1e+06]"),
    ("--mixup", "1e308", "[0, 1e+06]"), ("--workers", "100000", "[0, 256]"), ("--batch-size", "1" + "0" * 30, "[1, 1000000000]"),
]


@pytest.mark.parametrize("flag,value,allowed", BAD_NUMBERS)
def test_out_of_range_numbers_are_usage_errors(flag, value, allowed, capsys):
    """Before: --ema 2 extrapolated, --gamma -1 made the lr negative, --lr nan trained on NaN,
    --seed -1 failed without naming the flag, --label-smoothing 1.5 / --step-size 0 crashed."""
    with pytest.raises(SystemExit) as e:
        train.get_args_parser().parse_args(["--model", "lenet5", "--dataset", "synthetic", flag, value])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: argument " + flag) or f"argument {flag}:" in last, last
    assert allowed in last, last


def test_numbers_at_the_edges_of_their_ranges_are_accepted():
    a = train.get_args_parser().parse_args(
        ["--ema", "0", "--mixup", "0", "--weight-decay", "0", "--gamma", "1", "--lr", "1e-9", "--momentum", "0",
         "--seed", "0", "--label-smoothing", "0", "--step-size", "1", "--patience", "0", "--warmup-epochs", "0",
         "--val-split", "0", "--cutout", "0", "--clip-grad", "0", "--workers", "0", "--dropout", "0",
         "--milestones", "1", "2"])
    assert (a.ema, a.gamma, a.seed, a.milestones, a.dropout) == (0.0, 1.0, 0, [1, 2], 0.0)


def test_image_size_too_small_names_the_smallest_that_works(tmp_path, capsys):
    """Before: a conv2d traceback from the first training step."""
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "--model", "lenet5", *TINY, "--image-size", "7", "--out", out)
    assert rc == 1
    line = one_error_line(err)
    assert "lenet5 needs images of at least 12x12 px" in line and "7x7" in line
    assert not out.exists()
    # Checked against the model itself: 12 px goes through, 11 does not.
    for size, fits in ((12, True), (11, False)):
        m = models.MODELS["lenet5"](10, 3, size).eval()  # the builder itself: no size check
        try:
            m(torch.zeros(1, 3, size, size))
            ok = True
        except RuntimeError:
            ok = False
        assert ok == fits, size


# ----------------------------------------------------------------------------- checkpoint.py

def test_checkpoint_of_another_program_is_refused(tmp_path, capsys):
    """Before: only the key `format` was checked, not its value."""
    ck = checkpoint.make_checkpoint(model_name="lenet5", model_options={}, num_classes=10, in_channels=3,
                                    image_size=32, model=models.build_model("lenet5", 10).state_dict())
    path = tmp_path / "other.pt"
    torch.save({**ck, "format": "other-program/3"}, path)
    with pytest.raises(checkpoint.CheckpointError, match=r"format is 'other-program/3'"):
        checkpoint.load_checkpoint(path)
    rc, _, err = cli(capsys, "--resume", path, "--out", tmp_path / "run")
    assert rc == 1 and "other-program/3" in one_error_line(err)


class MkdirPayload:
    """Unpickling this calls os.mkdir (module posix, blocklisted by torch 2.14's loader)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class OpenPayload(MkdirPayload):
    """Unpickling this calls open (a global the loader does not allow)."""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("payload,torch_says", [(MkdirPayload, "blocked"), (OpenPayload, "Unsupported global")])
def test_pickled_code_is_refused_with_the_installed_torchs_message(tmp_path, payload, torch_says):
    """torch 2.14 words a blocklisted module 'unsupported GLOBAL ... is blocked'; before, only
    'Unsupported global' was recognised and the refusal read as a damaged file."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": {}, "x": payload(str(marker))}, path)
    with pytest.raises(Exception) as raw:  # what this torch itself says
        torch.load(path, weights_only=True)
    assert torch_says in str(raw.value)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load") as e:
        checkpoint.load_checkpoint(path)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_link_without_hard_links_copies(tmp_path, monkeypatch):
    """best.pt is a second name for last.pt (one write per epoch); where the file system has no
    hard links it is a copy, and the previous best.pt is replaced only once the copy is whole."""
    checkpoint.save({"epoch": 1}, tmp_path / "last.pt")
    checkpoint.link(tmp_path / "last.pt", tmp_path / "best.pt")
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")
    checkpoint.save({"epoch": 2}, tmp_path / "last.pt")  # a new file: best.pt keeps epoch 1
    assert load(tmp_path / "best.pt") == {"epoch": 1}

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    checkpoint.link(tmp_path / "last.pt", tmp_path / "best.pt")
    assert not os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")
    assert load(tmp_path / "best.pt") == {"epoch": 2}
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- issue 27: wrong-typed fields

WRONG_FIELDS = [  # (field, value, what the error line says it expected)
    ("classes", "abc", "list of class names"), ("classes", [1, 2], "list of class names"),
    ("classes", ["a"] * 3, "expected 10"), ("model_options", [], "a dict of options"),
    ("model", [1, 2], "a state_dict"), ("model", {"fc.weight": 1.0}, "a state_dict"),
    ("epoch", "1", "an integer >= 0"), ("epoch", 1.5, "an integer >= 0"), ("epoch", True, "an integer >= 0"),
    ("history", "rows", "a list of dicts"), ("history", [1, 2], "a list of dicts"), ("args", ["--lr"], "a dict"),
    ("num_classes", "10", "an integer >= 1"), ("image_size", 0, "an integer >= 1"), ("model_name", "resnet19", "a model"),
    ("mean", "x", "finite numbers"), ("mean", [0.5, float("nan"), 0.5], "finite numbers"), ("std", [0.5, 0.0, 0.5], "> 0"),
    ("std", [0.5], "expected 3"), ("rng", {"torch": 3}, "torch RNG state"), ("optimizer", [], "optimizer state"),
    ("ema", {"x": "y"}, "a state_dict"), ("init", "torchvision", "a dict"),
]


@pytest.mark.parametrize("field,value,expected", WRONG_FIELDS)
def test_wrong_typed_checkpoint_fields_are_one_line_everywhere(run1, tmp_path, capsys, field, value, expected):
    """Before: TypeError / AttributeError tracebacks from evaluate.py, export.py and --resume. Now
    checkpoint.load_checkpoint checks every field once: "error: CKPT: <field> is ..., expected ..."."""
    import evaluate
    import export
    bad = tmp_path / "bad" / "last.pt"
    bad.parent.mkdir()
    ck = load(run1 / "last.pt")
    if field == "classes" and expected == "expected 10":
        ck["num_classes"] = 10
    checkpoint.save({**ck, field: value}, bad)
    for script, argv in ((train, ["--resume", bad, "--epochs", "2"]), (evaluate, [bad, "--no-timing"]),
                         (export, [bad, "--out", tmp_path / "bad.onnx"])):
        assert script.cli([str(a) for a in argv]) == 1, script.__name__
        line = one_error_line(capsys.readouterr().err)
        assert f"{bad}: {field} " in line and expected in line, (script.__name__, line)
    assert load(bad)[field] == value or field in ("mean", "std")  # nothing written over it
    assert not (tmp_path / "bad.onnx").exists()


def test_ctrl_c_while_torch_imports_is_one_line():
    """Before: a KeyboardInterrupt traceback from inside `import torch` (issue 27, 5)."""
    import signal
    import time
    p = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(train.__file__), "train.py"), "--help"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # Python is up and importing runtime / torch (which takes seconds)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("torch imported before the signal came (a very fast machine)")
    assert p.returncode == 130 and err == "interrupted\n", (p.returncode, err)


# ----------------------------------------------------------------------------- issue 25: CUDA paths on the CPU

def test_torchrun_backend_follows_the_device(monkeypatch):
    """Before: NCCL whenever CUDA existed, also with --device cpu (DDP then fails on CPU tensors)."""
    import torch.distributed as dist
    seen = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend: seen.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("RANK", "0")
    assert runtime.start("cpu")[1:] == (2, torch.device("cpu")) and seen == ["gloo"]
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.start("cuda")[2] == torch.device("cuda", 1) and seen == ["gloo", "nccl"]


def test_cuda_rng_state_is_the_process_devices_own(run1, monkeypatch):
    """Before: one CUDA RNG state per visible GPU, and an IndexError resuming with fewer GPUs. Now the
    checkpoint holds the state of the process's own device, restored onto the device it resumes on."""
    ck = load(run1 / "last.pt")
    state = torch.get_rng_state()
    ck["rng"]["cuda"] = state
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append((s, d)))
    model = models.build_model("lenet5", 10, 3, 12)
    opt = train.build_optimizer(model, torch.device("cpu"), lr=0.1, weight_decay=0.0)
    sched = train.Schedule(opt, "cosine", 2, 2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    device = torch.device("cuda", 0)
    train.restore_state(ck, "x", opt, sched, scaler, None, device)
    assert len(calls) == 1 and torch.equal(calls[0][0], state) and calls[0][1] == device


def test_deterministic_is_strict_and_sets_cublas_workspace(monkeypatch):
    """Before: warn_only=True (no promise kept), no CUBLAS_WORKSPACE_CONFIG, compile auto on CUDA."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        runtime.start("cpu", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_reduce_overhead_under_ddp_says_graphs_are_skipped():
    bn = models.build_model("resnet20", 10)
    assert "skips CUDA graphs" in runtime.cudagraph_note("reduce-overhead", 2, bn)
    assert runtime.cudagraph_note("reduce-overhead", 1, bn) is None
    assert runtime.cudagraph_note("default", 2, bn) is None
    assert runtime.cudagraph_note("reduce-overhead", 2, models.build_model("lenet5", 10)) is None
