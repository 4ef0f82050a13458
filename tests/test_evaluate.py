"""evaluate.py: metric functions against hand-computed values, the CLI end to end on a
checkpoint trained here on the synthetic dataset, plots, comparison table (compare.py), and errors."""
import csv
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

import evaluate as ev
from data import load_data, make_loader
import checkpoint
from checkpoint import load_checkpoint, model_from_checkpoint
from models import build_model

SIZE, LIMIT_TEST = 8, 200  # tiny images keep the CPU training and evaluation fast


# ----------------------------------------------------------------------------- pure metrics

def test_topk_ties_and_clipping():
    logits = torch.tensor([[1., 3., 3., 0.],   # target 2 ties class 1 (lower index wins): rank 1
                           [2., 2., 2., 2.],   # target 0, all tied: rank 0
                           [0., 1., 2., 3.],   # target 0 is last: rank 3
                           [5., 0., 5., 1.]])  # target 2 ties class 0: rank 1
    targets = torch.tensor([2, 0, 0, 2])
    assert ev.target_rank(logits, targets).tolist() == [1, 0, 3, 1]
    r = ev.evaluate(torch.nn.Identity(), [(logits, targets)], 4)  # the logits are the "model's" output
    assert r["top1"] == 0.25
    assert r["top5"] == 1.0  # k=5 > 4 classes: clipped to 4, everything is a hit
    assert r["top1"] == (logits.argmax(1) == targets).sum().item() / 4  # same tie rule as argmax


def test_confusion_matrix_and_zero_division():
    # class 1 never appears in the labels; class 2 is never predicted
    targets = torch.tensor([0, 0, 0, 2, 2])
    preds = torch.tensor([0, 0, 1, 0, 1])
    cm = ev.confusion_matrix(preds, targets, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 0, 0], [1, 1, 0]]  # rows true, columns predicted
    m = ev.per_class_metrics(cm, ["a", "b", "c"])
    a, b, c = m["per_class"]
    assert a == {"class": "a", "precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                 "f1": pytest.approx(2 / 3), "support": 3}
    assert b == {"class": "b", "precision": 0.0, "recall": None, "f1": None, "support": 0}
    assert c == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    # macro over the classes present in the labels (a, c)
    assert m["macro"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})


def test_evaluate_matches_a_plain_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    xs, ys = torch.randn(50, 3, 2, 2), torch.randint(0, 7, (50,))
    loader = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 50, 16)]  # last batch partial
    model.train()
    r = ev.evaluate(model, loader, 7, keep_predictions=True)
    assert model.training  # previous mode restored
    with torch.no_grad():
        logits = model.eval()(xs)
    assert r["n"] == 50
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, ys).item(), rel=1e-5)
    assert r["top1"] * 50 == (logits.argmax(1) == ys).sum().item()
    assert r["top5"] * 50 == (logits.topk(5, 1).indices == ys[:, None]).any(1).sum().item()
    assert r["confusion_matrix"].sum() == 50 and r["preds"].tolist() == logits.argmax(1).tolist()
    assert r["confidence"].tolist() == pytest.approx(logits.softmax(1).amax(1).tolist(), rel=1e-5)
    # flip-TTA = the mean of the softmax over x and its mirror image
    flipped = model(xs.flip(-1)).detach()
    mean_prob = (logits.softmax(1) + flipped.softmax(1)) / 2
    t = ev.evaluate(model, loader, 7, tta=True)
    assert t["top1"] * 50 == (mean_prob.argmax(1) == ys).sum().item()
    assert t["loss"] == pytest.approx(F.nll_loss(mean_prob.log(), ys).item(), rel=1e-5)
    # three classes: top-5 is clipped to top-3 = 1.0
    three = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    assert ev.evaluate(three, [(xs, ys % 3)], 3)["top5"] == 1.0


def test_output_dirs(tmp_path):
    a, b, c = tmp_path / "r1" / "best.pt", tmp_path / "r2" / "best.pt", tmp_path / "r1" / "last.pt"
    assert ev.output_dirs([a], None) == [tmp_path / "r1"]
    assert ev.output_dirs([a], "o") == [ev.Path("o")]
    assert ev.output_dirs([a, b], "o") == [ev.Path("o/r1"), ev.Path("o/r2")]
    assert ev.output_dirs([a, c], "o") == [ev.Path("o/r1-best"), ev.Path("o/r1-last")]
    assert ev.output_dirs([a, c], None) == [tmp_path / "r1" / "eval-best", tmp_path / "r1" / "eval-last"]


# ----------------------------------------------------------------------------- fixtures

def make_checkpoint(model, data, path, *, ema=None, num_classes=10, val_split=0.0, history=None):
    ck = checkpoint.make_checkpoint(
        model_name="resnet20", model_options={}, num_classes=num_classes, in_channels=3, image_size=SIZE,
        classes=data.classes, mean=data.mean, std=data.std,
        args={"dataset": "synthetic", "data_dir": str(path.parent / "no-data-needed"),
              "val_split": val_split, "seed": 0, "limit_test": LIMIT_TEST, "limit_train": None,
              "epochs": 1, "batch_size": 32},
        epoch=1, model=model.state_dict(), ema=ema, optimizer={}, scheduler={}, scaler={},
        rng={"torch": torch.get_rng_state()},
        history=history or [{"epoch": 1, "lr": 0.1, "train_loss": 1.0, "epoch_seconds": 30.0,
                             "test_top1": None}])
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(ck, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """runA: resnet20 after a few Adam steps (well above chance, with mistakes), EMA = its random
    init; runB: random weights. Both for the synthetic dataset at 8 x 8."""
    root = tmp_path_factory.mktemp("eval")
    data = load_data("synthetic", image_size=SIZE, limit_test=LIMIT_TEST)
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, SIZE)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = make_loader(data.train, mean=data.mean, std=data.std, batch_size=64, train=True)
    model.train()
    for i, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 24:
            break
    # BatchNorm running stats lag far behind after so few steps: re-estimate them (no grad)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for i, (x, _) in zip(range(8), loader):
            model(x)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    a = make_checkpoint(model, data, root / "runA" / "best.pt", ema=init)
    torch.manual_seed(1)
    b = make_checkpoint(build_model("resnet20", 10, 3, SIZE), data, root / "runB" / "best.pt",
                        history=[{"epoch_seconds": 10.0}, {"epoch_seconds": 20.0}])
    return root, a, b


@pytest.fixture(scope="module")
def cli(ckpts):
    """One CLI run on both checkpoints (timing on, short on the CPU): per-run folders + comparison."""
    root, a, b = ckpts
    out = root / "out"
    p = run_script("evaluate.py", a, b, "--out", out, "--tta", "--summary", "--batch-size", "64",
                   "--device", "cpu")
    assert p.returncode == 0, p.stderr
    return p, out / "runA", json.loads((out / "runA" / "eval.json").read_text())


# ----------------------------------------------------------------------------- the CLI

def test_eval_json(cli):
    p, out, r = cli
    for key in ("top1", "top5", "loss", "per_class", "macro", "confusion_matrix", "params", "macs",
                "latency_ms_batch1", "latency_ms_batch1_p90", "images_per_second", "timing_batch_size",
                "dataset", "split", "model", "model_options", "checkpoint", "epoch", "device", "torch",
                "tta", "tta_top1", "tta_top5"):
        assert key in r, key
    assert r["dataset"] == "synthetic" and r["split"] == "test" and r["model"] == "resnet20"
    assert r["n"] == LIMIT_TEST and r["epoch"] == 1 and r["weights"] == "model"
    assert 0.3 < r["top1"] < 1.0 and r["top1"] <= r["top5"] <= 1.0 and r["loss"] > 0  # > chance (0.1)
    cm = torch.tensor(r["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == LIMIT_TEST
    assert cm.trace().item() / cm.sum().item() == pytest.approx(r["top1"], abs=1e-12)
    assert [c["support"] for c in r["per_class"]] == cm.sum(1).tolist()
    assert set(r["per_class"][0]) == {"class", "precision", "recall", "f1", "support"}
    assert set(r["macro"]) == {"precision", "recall", "f1"}
    assert r["params"] == sum(t.numel() for t in build_model("resnet20", 10, 3, SIZE).parameters())
    assert r["macs"] > 0 and r["train_seconds"] == 30.0
    assert 0 < r["latency_ms_batch1"] <= r["latency_ms_batch1_p90"] and r["images_per_second"] > 0
    assert r["timing_batch_size"] == 64
    # what ran: fp32 (--amp auto evaluates in fp32 everywhere), channels_last (training's CPU
    # default), no CUDA settings on the CPU
    assert (r["amp"], r["channels_last"], r["tf32"], r["cudnn_benchmark"]) == ("fp32", True, None, None)
    assert 0 <= r["tta_top1"] <= 1 and r["tta"]["top1"] == r["tta_top1"]
    assert "top-1" in p.stdout and "top-5" in p.stdout and f"{r['top1']:.2%}" in p.stdout
    assert "flip-TTA" in p.stdout and "total parameters" in p.stdout  # --summary prints the table


def test_top1_recomputed_independently(cli, ckpts):
    _, _, r = cli
    ck = load_checkpoint(ckpts[1])
    model = model_from_checkpoint(ck)
    test = load_data("synthetic", image_size=ck["image_size"], channels=ck["in_channels"],
                     limit_test=ck["args"]["limit_test"], seed=ck["args"]["seed"]).test
    mean, std = torch.tensor(ck["mean"]).view(1, 3, 1, 1), torch.tensor(ck["std"]).view(1, 3, 1, 1)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 50):
            x = (test.images[i:i + 50].float() / 255 - mean) / std
            correct += (model(x).argmax(1) == test.labels[i:i + 50]).sum().item()
    assert abs(correct / len(test) - r["top1"]) <= 1 / len(test)  # at most one near-tie flips


def test_files(cli):
    from matplotlib.image import imread

    _, out, r = cli
    rows = list(csv.reader(open(out / "confusion_matrix.csv")))
    assert rows[0][1:] == [f"class{i}" for i in range(10)]
    assert [[int(v) for v in row[1:]] for row in rows[1:]] == r["confusion_matrix"]
    for name, min_size in (("confusion_matrix.png", 500), ("misclassified.png", 300)):
        img = imread(out / name)
        assert img.ndim == 3 and min(img.shape[:2]) >= min_size and max(img.shape[:2]) < 5000, name
        assert img[..., :3].std() > 0.05, name  # not a blank canvas
    text = (out / "summary.txt").read_text()
    assert "layer" in text and "Conv2d" in text and f"{r['params']:,}" in text


def test_plots_100_classes(tmp_path):
    from matplotlib.image import imread

    names = [f"class_name_{i:03d}" for i in range(100)]
    g = torch.Generator().manual_seed(0)
    cm = torch.randint(0, 3, (100, 100), generator=g) + torch.diag(torch.full((100,), 40))
    ev.plot_confusion_matrix(cm, names, tmp_path / "cm.png")
    img = imread(tmp_path / "cm.png")
    assert 1500 < img.shape[1] < 6000 and 800 < img.shape[0] < 4000
    images = [torch.rand(1, 28, 28, generator=g) for _ in range(8)]  # grayscale, fewer than a full grid
    ev.plot_misclassified(images, list(range(8)), list(range(10, 18)), [0.9] * 8, names, tmp_path / "m.png")
    assert imread(tmp_path / "m.png").shape[0] > 200


def test_two_checkpoints_comparison(cli):
    p, out_a, ra = cli
    out = out_a.parent
    rb = json.loads((out / "runB" / "eval.json").read_text())
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert [r["run"] for r in rows] == ["runA/best.pt", "runB/best.pt"]
    assert {"model", "dataset", "params", "macs", "top1", "top5", "latency_ms_batch1",
            "images_per_second", "epochs", "train_seconds"} <= set(rows[0])
    assert float(rows[0]["top1"]) == ra["top1"] and float(rows[1]["top1"]) == rb["top1"]
    assert float(rows[1]["latency_ms_batch1"]) == rb["latency_ms_batch1"]
    assert float(rows[0]["train_seconds"]) == 30.0 and float(rows[1]["train_seconds"]) == 30.0
    table = [ln for ln in p.stdout.splitlines() if ln.startswith("|")]
    assert len(table) == 4 and "top-1" in table[0] and "runB/best.pt" in table[3]
    assert f"{ra['top1']:.2%}" in table[2] and "0.5 min" in table[3]
    assert (out / "comparison.md").read_text().count("\n") == 4


def test_ema_weights(ckpts, tmp_path):
    a = ckpts[1]
    ev.main(ev.get_args_parser().parse_args([str(a), "--ema", "--no-timing", "--out", str(tmp_path)]))
    ra = json.loads((tmp_path / "eval.json").read_text())
    assert ra["weights"] == "ema" and ra["latency_ms_batch1"] is None
    # runA's EMA is its random init: evaluated independently, its top-1 must match
    ck = load_checkpoint(a)
    model = model_from_checkpoint(ck, ema=True)
    test = load_data("synthetic", image_size=SIZE, limit_test=LIMIT_TEST).test
    x = (test.images.float() / 255 - torch.tensor(ck["mean"]).view(1, 3, 1, 1)) / torch.tensor(ck["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        correct = (model(x).argmax(1) == test.labels).sum().item()
    assert abs(correct / len(test) - ra["top1"]) <= 1 / len(test)


def test_val_split_rebuilt_from_the_checkpoint(tmp_path, capsys):
    data = load_data("synthetic", image_size=SIZE, limit_test=LIMIT_TEST)
    path = make_checkpoint(build_model("resnet20", 10, 3, SIZE), data, tmp_path / "v" / "best.pt",
                           val_split=0.1)
    ev.main(ev.get_args_parser().parse_args([str(path), "--split", "val", "--no-timing", "--ema"]))
    r = json.loads((tmp_path / "v" / "eval.json").read_text())  # default: beside the checkpoint
    assert r["weights"] == "model" and "no EMA weights" in capsys.readouterr().err  # falls back
    assert r["split"] == "val" and r["n"] == 256  # 10% of the 2560 synthetic training images
    assert sum(map(sum, r["confusion_matrix"])) == 256 and (tmp_path / "v" / "misclassified.png").exists()


# ----------------------------------------------------------------------------- errors

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_bad_checkpoints_one_line_error(ckpts, tmp_path):
    """A corrupt file, a non-checkpoint and a pickle payload: exit 1, one "error:" line, and the
    payload never runs."""
    marker = tmp_path / "marker"
    paths = {kind: tmp_path / f"{kind}.pt" for kind in ("corrupt", "not-a-checkpoint", "payload")}
    paths["corrupt"].write_bytes(ckpts[1].read_bytes()[:5000])
    torch.save({"weights": torch.zeros(3)}, paths["not-a-checkpoint"])
    ck = torch.load(ckpts[1], weights_only=True)
    torch.save({**ck, "payload": Payload(str(marker))}, paths["payload"])
    words = {"corrupt": "cannot read checkpoint", "not-a-checkpoint": "not a deeper-networks checkpoint",
             "payload": "refusing to load"}
    for kind, path in paths.items():
        r = run_script("evaluate.py", path, "--no-timing", "--out", tmp_path / kind)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), (kind, r.stderr)
        assert str(paths[kind]) in lines[0] and words[kind] in lines[0]
        assert not (tmp_path / kind).exists()
    assert not marker.exists()


def test_user_errors_are_one_line(ckpts, tmp_path):
    a = ckpts[1]
    parse = ev.get_args_parser().parse_args
    cases = [
        ([str(a), "--dataset", "mnist", "--data-dir", str(tmp_path / "missing")], "not found"),
        ([str(a), "--split", "val"], "validation split"),
        ([str(tmp_path / "nope.pt")], "checkpoint not found"),
    ]
    data = load_data("synthetic", image_size=SIZE, limit_test=LIMIT_TEST)
    five = make_checkpoint(build_model("resnet20", 5, 3, SIZE), data, tmp_path / "five" / "best.pt",
                           num_classes=5)
    checkpoint.save({**torch.load(five, weights_only=True), "classes": None}, five)  # no names: the count
    cases.append(([str(five)], "has 10 classes"))
    for argv, words in cases:
        with pytest.raises(ValueError) as e:
            ev.main(parse(argv + ["--no-timing", "--out", str(tmp_path / "o")]))
        assert words in str(e.value) and "\n" not in str(e.value)
