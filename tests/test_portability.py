"""Off-Linux behaviour checked on Linux: no Linux-only call may crash a script (os.sched_getaffinity
is missing on macOS and Windows), and Apple's MPS device is chosen and configured when torch
reports it (faked here: no Mac at hand)."""
import os

import pytest
import torch
from PIL import Image

import evaluate
import runtime
import train


def write_folder(root, classes=("a", "b"), n=6, size=12):
    g = torch.Generator().manual_seed(0)
    for split, k in (("train", n), ("test", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(k):
                px = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(root / split / c / f"{i}.png")


def test_scripts_run_without_sched_getaffinity(tmp_path, monkeypatch, capsys):
    """Before: data.py's decoder pool called os.sched_getaffinity (AttributeError off Linux)."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert runtime.cpu_count() == (os.cpu_count() or 1)
    write_folder(tmp_path / "d")
    args = train.parse_args([
        "--model", "lenet5", "--dataset", "folder", "--data-dir", str(tmp_path / "d"), "--epochs", "1",
        "--batch-size", "4", "--image-size", "32", "--device", "cpu", "--out", str(tmp_path / "run")])
    train.main(args)  # folder decode (thread pool), training, checkpoint, plots
    reports = evaluate.main(evaluate.get_args_parser().parse_args(
        [str(tmp_path / "run" / "best.pt"), "--no-timing", "--device", "cpu"]))
    assert reports[0]["report"]["n"] == 4


@pytest.fixture
def fake_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


def test_auto_device_picks_mps_and_configures_it(fake_mps):
    device = runtime.pick_device("auto")
    assert device.type == "mps"
    assert runtime.pick_amp("auto", device, training=True)[0] == torch.float16  # MPS autocast: fp16
    assert runtime.pick_device("mps").type == "mps"
    assert runtime.device_name(device).startswith("Apple MPS")


def test_mps_refused_where_absent(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no Apple MPS device"):
        runtime.pick_device("mps")


@pytest.mark.parametrize("module", ["train", "evaluate", "export", "bench"])
def test_every_script_accepts_device_mps(module):
    mod = __import__(module)
    action = next(a for a in mod.get_args_parser()._actions if a.dest == "device")
    assert "mps" in action.choices
