"""studies/: every study script end to end on the CPU (a reduced matrix, 1 epoch, tiny synthetic
data), the full default matrices as dry runs checked against train.py's parser, and
prepare_mnist_8k2k.py on a self-made IDX fixture."""
import csv
import gzip
import importlib.util
import json
import os
import shlex
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

import data
import train

STUDIES = REPO / "studies"
KNOBS = ("OUT", "SEEDS", "DATASETS", "EPOCHS", "EPOCHS_SCALE", "EXTRA", "EVAL_EXTRA", "PYTHON", "DRY_RUN", "MODELS",
         "LRS", "KERNELS", "RESIDUALS", "AUX", "BASELINES", "LR", "DEPTHS", "PLAIN_DEPTHS",
         "DATASET_CIFAR", "DATA_CIFAR", "DATASET_MNIST", "DATA_MNIST", "DATASET_CIFAR100",
         "DATA_CIFAR100", "DATASET_FMNIST", "DATA_FMNIST")
# Tiny but real: 1 epoch of 2 steps (batch 16) at 8 px per run, so the time goes mostly to python
# start-up (~4 s a process); the MNIST rows get 1-channel synthetic data.
TINY = {"DATASET_CIFAR": "synthetic", "DATASET_MNIST": "synthetic", "EPOCHS": "1",
        "EXTRA": "--limit-train 32 --limit-test 20 --batch-size 16 --image-size 8 --device cpu",
        "EVAL_EXTRA": "--no-timing --device cpu"}


def study(name, out, timeout=600, python=sys.executable, **knobs):
    """Run studies/NAME.sh; python: the PYTHON it starts the scripts with (tests that train pass
    the fork_python fixture: the same scripts, without a torch import per run)."""
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(PYTHON=str(python), OUT=str(out), **knobs)
    return subprocess.run(["bash", str(STUDIES / f"{name}.sh")], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def train_commands(stdout):
    """The train.py argument lists of the printed commands ('+ python .../train.py ARGS')."""
    cmds = [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]
    return [c[2:] for c in cmds if c[1].endswith("train.py")]


def config(out, name):
    return json.loads((out / name / "config.json").read_text())


def check_study(out, expected, diverged=()):
    """Every run has best.pt or is listed as diverged; comparison.csv has one row per other run."""
    listed = (out / "diverged.txt").read_text().split() if (out / "diverged.txt").exists() else []
    assert sorted(listed) == sorted(diverged)
    for name in expected:
        assert (out / name / "best.pt").is_file() or name in diverged, name
        assert (out / name / "train.log").is_file(), name
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == sorted(f"{n}/best.pt" for n in expected if n not in diverged)
    assert (out / "comparison.md").read_text().startswith("| run | model |")
    assert (out / "curves.png").is_file() and (out / "tradeoff.png").is_file()  # the figures over runs


# ----------------------------------------------------------------------------- full matrices, dry

def test_dry_runs_list_the_full_studies_with_valid_flags(tmp_path):
    parser = train.get_args_parser()
    counts = {"depth_vs_lr": 12, "residual_inception": 9, "cifar_resnet_depth": 9, "architectures": 5}
    for name, n in counts.items():
        r = ok(study(name, tmp_path / name, DRY_RUN="1"))
        cmds = train_commands(r.stdout)
        assert len(cmds) == n, r.stdout
        outs = [parser.parse_args(c).out for c in cmds]  # argparse exits on an unknown flag
        assert len(set(outs)) == n and all(o.startswith(str(tmp_path / name)) for o in outs)
        assert r.stdout.strip().splitlines()[-1].startswith(f"+ {sys.executable} ")
        assert "evaluate.py" in r.stdout.strip().splitlines()[-1]
        assert not (tmp_path / name).exists()  # a dry run writes nothing

    r = ok(study("depth_vs_lr", tmp_path / "d", DRY_RUN="1"))
    runs = {os.path.basename(a.out): a for a in map(parser.parse_args, train_commands(r.stdout))}
    a = runs["cifar10-vgg16-lr0.1"]
    assert (a.model, a.dataset, a.data_dir, a.lr, a.epochs, a.augment, a.scheduler, a.optimizer,
            a.momentum, a.nesterov) == ("vgg16", "folder", "/tmp/cifar10-jpeg", 0.1, 20, "strong",
                                        "none", "sgd", 0.9, False)
    a = runs["mnist-resnet18-lr0.001"]
    assert (a.data_dir, a.epochs, a.channels, a.augment) == ("/tmp/mnist-8k2k", 10, 1, "none")

    r = ok(study("residual_inception", tmp_path / "r", DRY_RUN="1"))
    runs = {os.path.basename(a.out): a for a in map(parser.parse_args, train_commands(r.stdout))}
    assert (runs["googlenet-k5"].inception_kernel, runs["googlenet-k5"].residual) == (5, None)
    assert runs["googlenet-k5-projection"].residual == "projection"
    assert runs["googlenet-k3-aux"].aux_logits and runs["googlenet-k3-aux"].residual is None
    assert runs["vgg19"].model == "vgg19" and runs["vgg19"].inception_kernel is None

    for knobs, epochs, milestones in (({}, 164, [82, 123]), ({"EPOCHS_SCALE": "0.5"}, 82, [41, 61]),
                                      ({"EPOCHS": "3"}, 3, [1, 2]), ({"EPOCHS": "1"}, 1, [1, 1])):
        r = ok(study("cifar_resnet_depth", tmp_path / "c", DRY_RUN="1", **knobs))
        runs = {os.path.basename(a.out): a for a in map(parser.parse_args, train_commands(r.stdout))}
        assert set(runs) == {f"resnet{d}" for d in (20, 32, 44, 56, 110)} | {f"plain{d}" for d in (20, 32, 44, 56)}
        for a in runs.values():
            assert (a.epochs, a.milestones, a.weight_decay, a.lr, a.scheduler) == (epochs, milestones, 1e-4, 0.1, "multistep")
        assert runs["plain56"].plain and not runs["resnet56"].plain
        assert runs["resnet110"].warmup_epochs == 1

    r = ok(study("architectures", tmp_path / "a", DRY_RUN="1", DATA_CIFAR100="/d/c100", DATA_FMNIST="/d/fm",
                 EPOCHS_SCALE="0.1"))
    runs = {os.path.basename(a.out): a for a in map(parser.parse_args, train_commands(r.stdout))}
    assert len(runs) == 15
    assert (runs["cifar100-resnet50"].dataset, runs["cifar100-resnet50"].epochs) == ("cifar100", 6)
    assert (runs["fashion-mnist-alexnet"].data_dir, runs["fashion-mnist-alexnet"].augment) == ("/d/fm", "none")
    assert (runs["cifar10-vgg19"].scheduler, runs["cifar10-vgg19"].epochs) == ("cosine", 3)


# ----------------------------------------------------------------------------- end to end, tiny

def test_depth_vs_lr_records_divergence_and_goes_on(tmp_path, fork_python):
    out = tmp_path / "depth"
    # lr 1e30 makes VGG-16's loss non-finite at once: the stand-in for lr 0.1 on the real data.
    r = ok(study("depth_vs_lr", out, python=fork_python, MODELS="vgg16", LRS="1e30 0.01", **TINY))
    expected = ["mnist-vgg16-lr1e30", "mnist-vgg16-lr0.01", "cifar10-vgg16-lr1e30", "cifar10-vgg16-lr0.01"]
    check_study(out, expected, diverged=["mnist-vgg16-lr1e30", "cifar10-vgg16-lr1e30"])
    assert "| run | model |" in r.stdout and "diverged (not in the table)" in r.stdout
    assert sum(line.startswith("+ ") for line in r.stdout.splitlines()) == 5  # 4 trainings + evaluate
    mnist, cifar = config(out, "mnist-vgg16-lr0.01"), config(out, "cifar10-vgg16-lr0.01")
    assert (mnist["in_channels"], mnist["augment"], cifar["in_channels"], cifar["augment"]) == (1, "none", 3, "strong")
    assert (cifar["scheduler"], cifar["nesterov"], cifar["lr"]) == ("none", False, 0.01)
    assert (out / "mnist-vgg16-lr0.01" / "eval.json").is_file()

    # Started again: finished runs are skipped, diverged ones too, and the table is the same.
    r = ok(study("depth_vs_lr", out, python=fork_python, MODELS="vgg16", LRS="1e30 0.01", DRY_RUN="1", **TINY))
    assert r.stdout.count("finished before, skipped") == 2 and r.stdout.count("diverged before") == 2
    assert train_commands(r.stdout) == []


def test_residual_inception(tmp_path, fork_python):
    out = tmp_path / "ri"
    ok(study("residual_inception", out, python=fork_python, KERNELS="3", RESIDUALS="none identity", BASELINES="resnet20", **TINY))
    check_study(out, ["googlenet-k3", "googlenet-k3-identity", "googlenet-k3-aux", "resnet20"])
    assert config(out, "googlenet-k3")["model_options"] == {"inception_kernel": 3}
    assert config(out, "googlenet-k3-identity")["model_options"] == {"inception_kernel": 3, "residual": "identity"}
    assert config(out, "googlenet-k3-aux")["model_options"] == {"inception_kernel": 3, "aux_logits": True}
    assert (out / "resnet20" / "curves.png").is_file()


def test_cifar_resnet_depth(tmp_path, fork_python):
    out = tmp_path / "crd"
    r = ok(study("cifar_resnet_depth", out, python=fork_python, DEPTHS="20", PLAIN_DEPTHS="20", **TINY))
    check_study(out, ["resnet20", "plain20"])
    c = config(out, "plain20")
    assert (c["model_options"], c["milestones"], c["weight_decay"]) == ({"plain": True}, [1, 1], 1e-4)
    errors = (out / "errors.md").read_text().splitlines()
    assert len(errors) == 4 and errors[2].startswith("| resnet20 | 1 |") and "| plain20 |" in errors[3]
    assert "train error (%)" in r.stdout

    # An interrupted run (no "done:" in its log) resumes from last.pt when the study starts again;
    # with a single run left there is no table, only its evaluation.
    log = out / "resnet20" / "train.log"
    log.write_text("".join(line for line in log.read_text().splitlines(True) if not line.startswith("done:")))
    (out / "resnet20" / "eval.json").unlink()
    r = ok(study("cifar_resnet_depth", out, python=fork_python, DEPTHS="20", PLAIN_DEPTHS="", **{**TINY, "EPOCHS": "2"}))
    assert f"--resume {out}/resnet20/last.pt" in r.stdout and "epoch 2/2" in r.stdout
    assert "| run | model |" not in r.stdout and (out / "resnet20" / "eval.json").is_file()
    assert json.loads((out / "resnet20" / "eval.json").read_text())["epoch"] == 2
    errors = (out / "errors.md").read_text()  # every evaluated run of $OUT, not only this call's
    assert "| resnet20 | 2 |" in errors and "| plain20 | 1 |" in errors


def test_architectures_with_optional_dataset(tmp_path, fork_python):
    out = tmp_path / "arch"
    # resnet18, the study's smallest model: alexnet's 57M parameters made this test 20 s of writing checkpoints
    ok(study("architectures", out, python=fork_python, MODELS="resnet18", DATASET_FMNIST="synthetic",
             DATA_FMNIST=str(tmp_path / "fm"), **TINY))
    check_study(out, ["cifar10-resnet18", "fashion-mnist-resnet18"])
    assert (config(out, "cifar10-resnet18")["scheduler"], config(out, "fashion-mnist-resnet18")["augment"]) == ("cosine", "none")


def test_a_failing_run_stops_the_study(tmp_path, fork_python):
    out = tmp_path / "bad"
    r = study("cifar_resnet_depth", out, python=fork_python, DEPTHS="20", PLAIN_DEPTHS="", DATASET_CIFAR="folder",
              DATA_CIFAR=str(tmp_path / "missing"), EPOCHS="1", EXTRA="--device cpu")
    assert r.returncode == 1
    assert "error: resnet20 failed" in r.stderr and "missing" in (out / "resnet20" / "train.log").read_text()
    assert not (out / "diverged.txt").exists() and not (out / "comparison.csv").exists()


# ----------------------------------------------------------------------------- prepare_mnist_8k2k.py

def write_idx(path, array, magic):
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(raw)


@pytest.fixture
def idx_dir(tmp_path):
    """70 random 7x7 "digits" with uneven class counts (class c: c + 2 images, then 5 more)."""
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.repeat(np.arange(10), np.arange(10) + 2))  # 65 labels
    labels = np.concatenate([labels, [9, 9, 9, 0, 1]])  # 70
    images = rng.integers(0, 256, (len(labels), 7, 7), dtype=np.uint8)
    d = tmp_path / "idx"
    d.mkdir()
    write_idx(d / "t10k-images-idx3-ubyte.gz", images, 0x00000803)
    write_idx(d / "t10k-labels-idx1-ubyte", labels, 0x00000801)  # uncompressed works too
    return d, images, labels


def prepare(*args):
    return subprocess.run([sys.executable, str(STUDIES / "prepare_mnist_8k2k.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_prepare_mnist_split(idx_dir, tmp_path):
    from PIL import Image
    src, images, labels = idx_dir
    out = tmp_path / "mnist"
    r = prepare(src, out, "--test", 14, "--seed", 3)
    assert r.returncode == 0, r.stderr
    seen = {}
    for split in ("train", "test"):
        for f in sorted((out / split).glob("*/*.png")):
            i = int(f.stem)
            assert i not in seen  # every image once, train and test disjoint
            seen[i] = split
            assert int(f.parent.name) == labels[i]
            assert np.array_equal(np.asarray(Image.open(f)), images[i])
    assert sorted(seen) == list(range(len(labels)))
    test = np.array([i for i, s in seen.items() if s == "test"])
    assert len(test) == 14
    share = np.bincount(labels, minlength=10) * 14 / len(labels)  # stratified: floor or ceil of the share
    got = np.bincount(labels[test], minlength=10)
    assert np.all((got >= np.floor(share)) & (got <= np.ceil(share)))

    d = data.load_data("folder", str(out))
    assert (d.classes, d.in_channels, len(d.train), len(d.test)) == ([str(c) for c in range(10)], 1, 56, 14)

    r = prepare(src, out)  # never mixes two splits in one folder
    assert r.returncode == 1 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_prepare_mnist_split_is_seeded(idx_dir):
    spec = importlib.util.spec_from_file_location("prepare_mnist_8k2k", STUDIES / "prepare_mnist_8k2k.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, _, labels = idx_dir
    a, b, c = (mod.stratified_split(labels, 14, s) for s in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    big = np.arange(10_000) % 10  # the real sizes: 8,000 / 2,000, 200 per digit here
    train_idx, test_idx = mod.stratified_split(big, 2000, 0)
    assert len(train_idx) == 8000 and np.all(np.bincount(big[test_idx]) == 200)
    with pytest.raises(ValueError, match="--test"):
        mod.stratified_split(labels, 70, 0)


def test_prepare_mnist_errors(idx_dir, tmp_path):
    src, images, labels = idx_dir
    write_idx(src / "t10k-labels-idx1-ubyte", labels, 0x00000803)  # labels with the images' magic
    r = prepare(src, tmp_path / "o")
    assert r.returncode == 1 and "not an IDX file of 1-D" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = prepare(tmp_path / "nowhere", tmp_path / "o")
    assert r.returncode == 1 and "missing" in r.stderr and "t10k-images-idx3-ubyte" in r.stderr
