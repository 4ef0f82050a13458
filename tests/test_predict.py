"""predict.py: runs with torch unimportable; its resize is torchvision's uint8 resize bit for bit;
its pixels and network inputs are data.py's for the same files; its top-1 and probabilities are
evaluate.py's / PyTorch's on a small folder; bad input gives one line and the right exit code."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import checkpoint
import evaluate
import export
import predict
from conftest import REPO
from data import load_data, make_loader
from models import build_model

CLASSES = ("ant", "bee", "cat")


def write_folder(root):
    """A folder dataset whose test images need every preprocessing step: JPEG and PNG, RGB, gray,
    16-bit gray, RGBA and palette files, smaller and larger than the model's 24 px, not square."""
    rng = np.random.default_rng(0)

    def pattern(h, w, c, label):  # a class-dependent gradient plus noise: the classes differ
        yy, xx = np.mgrid[0:h, 0:w]
        base = (xx * (label + 1) * 255 / w + yy * (2 - label) * 255 / h) % 256
        a = base[..., None] + rng.normal(0, 30, (h, w, c))
        return np.clip(a, 0, 255).astype(np.uint8)

    for label, name in enumerate(CLASSES):
        for split, n in (("train", 6), ("test", 5)):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                kind = (label + i) % 5 if split == "test" else 0
                if kind == 0:  # the common case: a 32 x 32 RGB JPEG (downscaled to 24)
                    Image.fromarray(pattern(32, 32, 3, label)).save(d / f"{i}.jpg", quality=90)
                elif kind == 1:  # RGB PNG, 17 x 29 (upscaled to 24)
                    Image.fromarray(pattern(17, 29, 3, label)).save(d / f"{i}.png")
                elif kind == 2:  # 8-bit gray PNG, 40 x 40
                    Image.fromarray(pattern(40, 40, 1, label)[..., 0]).save(d / f"{i}.png")
                elif kind == 3:  # 16-bit gray PNG and an RGBA PNG
                    a = pattern(30, 20, 1, label)[..., 0].astype(np.uint16) * 257 + rng.integers(0, 256, (30, 20))
                    Image.fromarray(a.astype(np.uint16)).save(d / f"{i}.png")
                    Image.fromarray(np.dstack([pattern(24, 50, 3, label), rng.integers(0, 256, (24, 50, 1),
                                                                                        dtype=np.uint8)])).save(d / f"{i}a.png")
                else:  # a palette GIF
                    Image.fromarray(pattern(33, 33, 3, label)).convert("P").save(d / f"{i}.gif")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("predict") / "data")


def test_folder_fixture_has_the_modes_it_claims(folder):
    modes = {Image.open(f).mode for f in (folder / "test").rglob("*.*")}
    assert {"RGB", "L", "I;16", "RGBA", "P"} <= modes


def test_resize_is_torchvisions_uint8_resize():
    """Bit-identical to torchvision's TF.resize(antialias=True) on uint8 (what data.py runs), down
    and up, square and not, 1 and 3 channels. (Pillow's own resize differs from it by 1 in ~1% of
    the pixels, which is why predict.py does not use it.)"""
    rng = np.random.default_rng(1)
    shapes = [(32, 32), (28, 28), (17, 29), (100, 75), (7, 9), (1, 5), (480, 640)]
    for (h, w), size, c in itertools.product(shapes, (8, 24, 32, 45, 224), (1, 3)):
        img = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        if (h + size) % 2:  # smooth images too, where rounding ties are more frequent
            img = (np.cumsum(img.astype(np.int64), axis=0) % 256).astype(np.uint8)
        ref = TF.resize(torch.from_numpy(img).permute(2, 0, 1).contiguous(), [size, size], antialias=True)
        np.testing.assert_array_equal(predict.resize(img, size), ref.permute(1, 2, 0).numpy(),
                                      err_msg=f"{h}x{w}x{c} -> {size}")


@pytest.mark.parametrize("channels", [3, 1])
def test_pixels_and_inputs_equal_data_py(folder, channels):
    """The uint8 pixels and the normalized float32 network input, for every test file, equal what
    data.py's folder path gives evaluate.py (exactly, not approximately)."""
    data = load_data("folder", folder, image_size=24, channels=channels)
    files = sorted((folder / "test").rglob("*.*"), key=lambda f: (CLASSES.index(f.parent.name), f.name))
    assert len(files) == len(data.test)
    ours = np.stack([predict.preprocess_uint8(f, 24, channels) for f in files])
    np.testing.assert_array_equal(ours, data.test.images.numpy())
    loader = make_loader(data.test, mean=data.mean, std=data.std, batch_size=len(files), train=False, workers=0)
    x, _ = next(iter(loader))
    np.testing.assert_array_equal(predict.normalize(ours, data.mean, data.std), x.numpy())


def trained_ish_checkpoint(path, folder, name="resnet20", in_channels=3, image_size=24):
    """A checkpoint of the folder dataset whose model separates its classes: a few SGD steps on the
    training split (seconds), so that predictions differ between images."""
    data = load_data("folder", folder, image_size=image_size, channels=in_channels)
    torch.manual_seed(0)
    model = build_model(name, len(CLASSES), in_channels, image_size)
    loader = make_loader(data.train, mean=data.mean, std=data.std, batch_size=len(data.train), train=False,
                         workers=0)
    x, y = next(iter(loader))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(15):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    ck = checkpoint.make_checkpoint(
        model_name=name, model_options={}, num_classes=len(CLASSES), in_channels=in_channels,
        image_size=image_size, classes=list(data.classes), mean=list(data.mean), std=list(data.std),
        args={"dataset": "folder", "data_dir": str(folder), "seed": 0, "val_split": 0.0},
        epoch=1, model=model.state_dict())
    checkpoint.save(ck, path)
    return ck, model


BLOCK_TORCH = "import sys\nfor m in ('torch', 'torchvision'):\n    sys.modules[m] = None  # import fails\n"


def run_without_torch(tmp_path, *args):
    """python predict.py ARGS in a subprocess where `import torch` (and torchvision) fail."""
    shim = tmp_path / "no_torch"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": str(shim)}
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr  # the shim works
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_predict_without_torch_equals_evaluate(tmp_path, folder):
    ck, model = trained_ish_checkpoint(tmp_path / "m.pt", folder)
    export.main(export.get_args_parser().parse_args([str(tmp_path / "m.pt")]))
    # evaluate.py's predictions on the test split, through its own data loading and evaluate()
    split = checkpoint.checkpoint_data(checkpoint.check_fields(ck, "m.pt"), tmp_path / "m.pt").test
    loader = make_loader(split, mean=ck["mean"], std=ck["std"], batch_size=7, train=False, workers=0)
    res = evaluate.evaluate(model, loader, len(CLASSES), keep_predictions=True)
    files = sorted((folder / "test").rglob("*.*"), key=lambda f: (CLASSES.index(f.parent.name), f.name))
    assert len(set(res["preds"].tolist())) > 1  # the model tells images apart: the comparison means something
    with torch.no_grad():
        prob = torch.cat([model(x).softmax(1) for x, _ in loader])

    r = run_without_torch(tmp_path, tmp_path / "m.onnx", folder / "test", "--json", "--batch-size", "4",
                          "--top-k", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["provider"] == "CPUExecutionProvider" and out["precision"] == "fp32"
    got = {p["image"]: p["top_k"] for p in out["predictions"]}
    assert sorted(got) == sorted(map(str, files))
    for i, f in enumerate(files):
        top = got[str(f)]
        assert top[0]["index"] == res["preds"][i].item(), f
        assert [t["class"] for t in top] == [ck["classes"][t["index"]] for t in top]
        np.testing.assert_allclose([t["probability"] for t in top], prob[i, [t["index"] for t in top]].numpy(),
                                   atol=1e-5)
    top1 = np.mean([got[str(f)][0]["index"] == CLASSES.index(f.parent.name) for f in files])
    assert top1 == pytest.approx(res["top1"])

    # tab-separated lines (cpp/classify's format), a single file, a static-batch model
    export.main(export.get_args_parser().parse_args([str(tmp_path / "m.pt"), "--static-batch", "--out",
                                                     str(tmp_path / "static.onnx")]))
    r = run_without_torch(tmp_path, tmp_path / "static.onnx", files[0], files[1], "--top-k", "9")
    assert r.returncode == 0, r.stderr
    lines = [line.split("\t") for line in r.stdout.strip().splitlines()]
    assert [(image, int(rank)) for image, rank, *_ in lines] == [(str(f), k) for f in files[:2] for k in (1, 2, 3)]
    assert int(lines[0][2]) == res["preds"][0].item() and int(lines[3][2]) == res["preds"][1].item()


def test_errors_are_one_line(tmp_path, folder, run):
    ck, _ = trained_ish_checkpoint(tmp_path / "m.pt", folder, "lenet5", 1, 16)
    export.main(export.get_args_parser().parse_args([str(tmp_path / "m.pt")]))
    image = next((folder / "test").rglob("*.jpg"))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    torch.onnx.export(torch.nn.Linear(4, 2).eval(), (torch.randn(1, 4),), tmp_path / "bare.onnx", dynamo=True)
    for key, value in (("mean", "[0.5, 0.5]"), ("classes", '["ant"]')):  # 1 channel, 3 logits: malformed
        proto = onnx.load(str(tmp_path / "m.onnx"))
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, key: value})
        onnx.save(proto, str(tmp_path / f"bad-{key}.onnx"))
    cases = [((tmp_path / "m.onnx", tmp_path / "missing.jpg"), 1, "no such file or directory"),
             ((tmp_path / "m.onnx", tmp_path / "broken.jpg"), 1, "cannot read image"),
             ((tmp_path / "m.onnx", tmp_path / "empty"), 1, "no .jpg/"),
             ((tmp_path / "nowhere.onnx", image), 1, "no such model file"),
             ((tmp_path / "bare.onnx", image), 1, "lacks export.py's metadata"),
             ((tmp_path / "bad-mean.onnx", image), 1, "is malformed (classes: one per logit; mean, std: one per"),
             ((tmp_path / "bad-classes.onnx", image), 1, "is malformed (classes: one per logit;"),
             ((tmp_path / "m.onnx", image, "--top-k", "0"), 2, "must be >= 1")]
    (tmp_path / "empty").mkdir()
    for args, code, message in cases:
        r = run("predict.py", *args)
        assert r.returncode == code, (args, r.stderr)
        last = r.stderr.strip().splitlines()[-1]  # argparse (exit 2) prints its usage first
        assert (code == 2 or len(r.stderr.strip().splitlines()) == 1) and message in last, (args, r.stderr)
    if predict.providers_for("auto")[0] == predict.PROVIDERS["cpu"]:  # no GPU here: TensorRT cannot run
        r = run("predict.py", tmp_path / "m.onnx", image, "--provider", "tensorrt")
        assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    r = run("predict.py", tmp_path / "m.onnx", image)  # gray model, RGB JPEG: converted after the resize
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == len(CLASSES)
