"""Faults and bad input for evaluate.py, export.py, data.py and models.py (issue 14): each test
builds the fault in the real on-disk format (checkpoints via checkpoint.save, CIFAR pickles,
PNG folders, the folder cache's zip) and checks the promise: no silent wrong result, one
`error:` line instead of a traceback or a crash, nothing run from a crafted file.

    python -m pytest -q tests/test_faults.py
"""
import hashlib
import io
import json
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from conftest import run_script
from test_data import write_cifar, write_folder

import bench
import checkpoint
import data
import evaluate as ev
import export
import models

SIZE = 8


def one_line(e):
    return "\n" not in str(e).strip()


def save_checkpoint(path, model, *, name, num_classes, in_channels=3, image_size=SIZE, classes=None,
                    dataset="synthetic", data_dir=None, limit_test=40, mean=None, std=None):
    ck = checkpoint.make_checkpoint(
        model_name=name, model_options={}, num_classes=num_classes, in_channels=in_channels,
        image_size=image_size, classes=classes, mean=mean or [0.5] * in_channels, std=std or [0.25] * in_channels,
        args={"dataset": dataset, "data_dir": str(data_dir or path.parent / "no-data"), "seed": 0,
              "val_split": 0.0, "limit_test": limit_test, "limit_train": None},
        epoch=1, model=model.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(ck, path)
    return path


def evaluate_main(*argv):
    return ev.main(ev.get_args_parser().parse_args([str(a) for a in argv]))


def export_main(*argv):
    return export.main(export.get_args_parser().parse_args([str(a) for a in argv]))


# ----------------------------------------------------------------------------- non-finite logits

class Fixed(torch.nn.Module):
    """A 'model' that answers the next rows of a fixed logits table, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.at = logits, 0

    def forward(self, x):
        out = self.logits[self.at:self.at + len(x)]
        self.at += len(x)
        return out


def test_nonfinite_logits_count_as_wrong():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[5.0, 1.0, 0.0],    # right (target 0)
                           [nan, nan, nan],    # NaN everywhere: the old rank said "first"
                           [inf, 0.0, 0.0],    # +inf on the target: still no valid output
                           [0.0, nan, 9.0],    # one NaN
                           [0.0, 1.0, 2.0],    # wrong (target 0, predicted 2)
                           [-inf, 0.0, 1.0]])  # -inf elsewhere
    targets = torch.tensor([0, 1, 0, 2, 0, 2])
    assert ev.target_rank(logits, targets).tolist() == [0, 3, 3, 3, 2, 3]
    loader = [(logits[:4].new_zeros(4, 1), targets[:4]), (logits[4:].new_zeros(2, 1), targets[4:])]
    r = ev.evaluate(Fixed(logits), loader, 3, keep_predictions=True)
    assert (r["top1"], r["top5"], r["n"], r["nonfinite_outputs"]) == (1 / 6, 2 / 6, 6, 4)  # top-5 clipped to 3
    assert r["preds"].tolist() == [0, -1, -1, -1, 2, -1]  # -1: no class
    assert r["confidence"][1:4].tolist() == [0.0, 0.0, 0.0]
    # the matrix holds only the two rows with a prediction; support counts every sample
    assert r["confusion_matrix"].tolist() == [[1, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert r["support"].tolist() == [3, 1, 2]
    m = ev.per_class_metrics(r["confusion_matrix"], ["a", "b", "c"], r["support"])
    assert [c["recall"] for c in m["per_class"]] == [1 / 3, 0.0, 0.0]
    assert [c["support"] for c in m["per_class"]] == [3, 1, 2]


def test_nan_weights_score_zero_and_warn(tmp_path, capsys):
    model = models.build_model("resnet20", 10, 3, SIZE)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    path = save_checkpoint(tmp_path / "nan" / "best.pt", model, name="resnet20", num_classes=10,
                           classes=data.DATASETS["synthetic"].classes)
    evaluate_main(path, "--no-timing", "--out", tmp_path / "out")
    r = json.loads((tmp_path / "out" / "eval.json").read_text())  # strict JSON: no NaN literal
    assert r["top1"] == 0.0 and r["top5"] == 0.0 and r["nonfinite_outputs"] == r["n"] == 40
    assert r["loss"] is None and sum(map(sum, r["confusion_matrix"])) == 0
    assert sum(c["support"] for c in r["per_class"]) == 40
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "non-finite" in warnings[0] and "40 of 40" in warnings[0]


# ----------------------------------------------------------------------------- the folder cache

def _rewrite_member(path, member_suffix, edit):
    """Edit the stored bytes of one member of a torch.save zip in place and fix its CRC-32 in the
    local header and the central directory, so the zip stays valid (testzip passes)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
        assert info.compress_type == zipfile.ZIP_STORED
        start_dir = z.start_dir
    raw = bytearray(open(path, "rb").read())
    off = info.header_offset
    start = off + 30 + int.from_bytes(raw[off + 26:off + 28], "little") + int.from_bytes(raw[off + 28:off + 30], "little")
    body = bytearray(raw[start:start + info.file_size])
    edit(body)
    raw[start:start + info.file_size] = body
    old, new = struct.pack("<I", info.CRC), struct.pack("<I", zlib.crc32(body))
    raw[off + 14:off + 18] = new
    central = start_dir  # walk the central directory to this member's entry
    while raw[central + 42:central + 46] != struct.pack("<I", off):
        assert raw[central:central + 4] == b"PK\x01\x02"
        central += 46 + sum(int.from_bytes(raw[central + k:central + k + 2], "little") for k in (28, 30, 32))
    assert raw[central + 16:central + 20] == old
    raw[central + 16:central + 20] = new
    open(path, "wb").write(raw)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None


def test_damaged_cache_inside_a_valid_zip_is_rebuilt(tmp_path, capsys):
    arrays = write_folder(tmp_path)
    fresh = data.load_data("folder", tmp_path)
    cache = next(p for p in (tmp_path / ".cache").iterdir() if p.name.startswith("train-"))

    def zero(body):
        body[100:400] = bytes(300)
    _rewrite_member(cache, "data/0", zero)
    assert not torch.equal(torch.load(cache, weights_only=True)["images"], fresh.train.images)  # damaged
    capsys.readouterr()
    again = data.load_data("folder", tmp_path)
    assert torch.equal(again.train.images, torch.from_numpy(arrays["train"][0]))  # what PIL wrote
    assert "checksum" in capsys.readouterr().err
    assert torch.equal(torch.load(cache, weights_only=True)["images"], fresh.train.images)  # rewritten


def test_cache_of_another_image_size_is_rebuilt(tmp_path, capsys):
    arrays = write_folder(tmp_path)
    data.load_data("folder", tmp_path)
    cache = next(p for p in (tmp_path / ".cache").iterdir() if p.name.startswith("train-"))
    wrong = torch.zeros(len(arrays["train"][1]), 3, 16, 16, dtype=torch.uint8)  # 16 px, not 32
    torch.save({"images": wrong, "sha256": hashlib.sha256(wrong.numpy()).hexdigest()}, cache)  # right checksum
    capsys.readouterr()
    d = data.load_data("folder", tmp_path)
    assert torch.equal(d.train.images, torch.from_numpy(arrays["train"][0]))
    assert "not uint8" in capsys.readouterr().err


# ----------------------------------------------------------------------------- class names

def _folder_checkpoint(tmp_path, classes, folder):
    torch.manual_seed(0)
    model = models.build_model("lenet5", len(classes), 3, 16)
    return save_checkpoint(tmp_path / "ck" / "best.pt", model, name="lenet5", num_classes=len(classes),
                           image_size=16, classes=classes, dataset="folder", data_dir=folder,
                           limit_test=None), model.eval()


def test_class_order_mapped_by_name(tmp_path, capsys):
    folder = tmp_path / "folder"
    arrays = write_folder(folder, size=(16, 16))  # cat, dog, frog; 3 test images each
    for f in ("cat/000.png", "cat/001.png", "dog/000.png"):  # supports 1, 2, 3: rows tell apart
        os.remove(folder / "test" / f)
    keep = [2] + [4, 5] + [6, 7, 8]  # the test images left, in folder order
    ck_classes = ["dog", "frog", "cat"]  # the order the model was trained with
    path, model = _folder_checkpoint(tmp_path, ck_classes, folder)
    evaluate_main(path, "--no-timing", "--out", tmp_path / "out")
    r = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert "another order" in capsys.readouterr().err
    x = torch.from_numpy(arrays["test"][0][keep]).float() / 255
    with torch.no_grad():
        preds = model((x - 0.5) / 0.25).argmax(1)
    truth = [ck_classes.index(["cat", "dog", "frog"][y]) for y in arrays["test"][1][keep]]
    cm = torch.zeros(3, 3, dtype=torch.long)
    for t, p in zip(truth, preds.tolist()):
        cm[t, p] += 1
    assert r["confusion_matrix"] == cm.tolist() and r["classes"] == ck_classes
    assert [c["support"] for c in r["per_class"]] == [2, 3, 1]  # dog, frog, cat


def test_other_class_names_are_refused(tmp_path):
    folder = tmp_path / "folder"
    write_folder(folder, size=(16, 16))
    path, _ = _folder_checkpoint(tmp_path, ["cat", "dog", "bird"], folder)
    with pytest.raises(ValueError) as e:
        evaluate_main(path, "--no-timing", "--out", tmp_path / "out")
    assert one_line(e.value) and "[cat, dog, frog]" in str(e.value) and "[cat, dog, bird]" in str(e.value)
    assert not (tmp_path / "out").exists()
    # export.py --check reads real images the same way: refused before anything is written
    with pytest.raises(ValueError) as e:
        export_main(path, "--check", "--out", tmp_path / "m.onnx")
    assert one_line(e.value) and "[cat, dog, bird]" in str(e.value) and not (tmp_path / "m.onnx").exists()


def test_classes_shorter_than_num_classes(tmp_path):
    folder = tmp_path / "folder"
    write_folder(folder, size=(16, 16))
    path, _ = _folder_checkpoint(tmp_path, ["cat", "dog", "frog"], folder)
    ck = torch.load(path, weights_only=True)
    checkpoint.save({**ck, "classes": ["cat", "dog"]}, path)
    with pytest.raises(ValueError) as e:
        evaluate_main(path, "--no-timing", "--out", tmp_path / "out")
    assert one_line(e.value) and "classes has 2 entries, expected 3" in str(e.value)


@pytest.mark.parametrize("key,value", [("model_name", ["resnet20"]), ("mean", [0.5, 0.5]), ("mean", "abc"),
                                       ("std", 2.5), ("std", [0.25, 0.0, 0.25]), ("args", [1, 2]),
                                       ("history", 7), ("history", [1, 2])])
def test_malformed_checkpoint_fields_are_one_line(tmp_path, key, value):
    """Fields of the wrong type or length (a hand-edited or foreign checkpoint) used to raise
    TypeError / AttributeError / RuntimeError tracebacks deep inside evaluate.py and export.py;
    the checkpoint's schema now refuses each where it loads, with one line naming the field."""
    path = save_checkpoint(tmp_path / "ck" / "best.pt", models.build_model("resnet20", 10, 3, SIZE),
                           name="resnet20", num_classes=10, classes=data.DATASETS["synthetic"].classes)
    checkpoint.save({**torch.load(path, weights_only=True), key: value}, path)
    for run in (lambda: evaluate_main(path, "--no-timing", "--out", tmp_path / "out"),
                lambda: export_main(path, "--out", tmp_path / "m.onnx")):
        with pytest.raises(ValueError, match=f"best.pt: {key} ") as e:
            run()
        assert one_line(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


# ----------------------------------------------------------------------------- empty classes

def test_empty_class_folder_is_dropped_with_a_warning(tmp_path, capsys):
    write_folder(tmp_path, size=(16, 16))
    (tmp_path / "train" / "ant").mkdir()  # sorts first: the labels of the others must not shift
    (tmp_path / "test" / "ant").mkdir()
    d = data.load_data("folder", tmp_path)
    assert d.classes == ["cat", "dog", "frog"] and d.num_classes == 3
    assert d.train.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "ant" in warnings[0]


def test_empty_class_with_test_images_and_single_class_refused(tmp_path):
    write_folder(tmp_path, size=(16, 16))
    for f in (tmp_path / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(data.DataError) as e:  # test/dog has images no training image teaches
        data.load_data("folder", tmp_path)
    assert one_line(e.value) and "dog (3)" in str(e.value)
    one = tmp_path / "one"
    write_folder(one, classes=("cat",), size=(16, 16))
    with pytest.raises(data.DataError, match="at least 2") as e:
        data.load_data("folder", one)
    assert one_line(e.value)


# ----------------------------------------------------------------------------- CIFAR pickles

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_crafted_cifar_pickle_never_runs(tmp_path):
    write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "wb") as f:
        pickle.dump({"data": np.zeros((10, 3072), np.uint8), "labels": [Payload(str(marker))] * 10}, f, protocol=2)
    with pytest.raises(data.DataError) as e:
        data.load_data("cifar10", tmp_path, download=False)
    assert one_line(e.value) and "data_batch_2" in str(e.value) and "refusing" in str(e.value)
    assert not marker.exists()
    # the same through evaluate.py: a checkpoint whose data_dir points at the crafted files
    path = save_checkpoint(tmp_path / "ck" / "best.pt", models.build_model("resnet20", 10, 3, 32),
                           name="resnet20", num_classes=10, image_size=32, classes=data.CIFAR10_CLASSES,
                           dataset="cifar10", data_dir=tmp_path)
    with pytest.raises(ValueError) as e:
        evaluate_main(path, "--no-timing")
    assert one_line(e.value) and "refusing" in str(e.value) and not marker.exists()


@pytest.mark.parametrize("style", ["protocol 2", "protocol 4", "protocol 5", "python 2 names"])
def test_legit_cifar_pickles_still_load(tmp_path, style):
    x, y, n = write_cifar(tmp_path, "cifar10")  # protocol 2, as test_data.py writes them
    folder = tmp_path / "cifar-10-batches-py"
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            d = pickle.load(fh)
        blob = pickle.dumps(d, protocol={"protocol 4": 4, "protocol 5": 5}.get(style, 2))
        if style == "python 2 names":  # the official files name numpy.core (numpy 1)
            blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            assert b"numpy.core.multiarray" in blob
        f.write_bytes(blob)
    d = data.load_data("cifar10", tmp_path, download=False)
    assert np.array_equal(d.train.images.reshape(n, -1).numpy(), x[:n])
    assert np.array_equal(d.test.labels.numpy(), y[n:])


# ----------------------------------------------------------------------------- images

def _chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(w, h, rows, idat=None):
    """An RGB PNG with valid chunk CRCs around the given rows (filter byte + pixels), compressed."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", idat or zlib.compress(rows)) + _chunk(b"IEND", b""))


def _damaged_files():
    w, h = 8, 6
    rng = np.random.default_rng(0)
    rows = b"".join(bytes([f]) + rng.integers(0, 256, 3 * w, dtype=np.uint8).tobytes() for f in (0, 1, 2, 3, 4, 0))
    stream = bytearray(zlib.compress(rows))
    stream[len(stream) // 2] ^= 0x10
    flipped = bytearray(_png(w, h, rows))
    flipped[60] ^= 0x04
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    return {
        "bad row filter.png": _png(w, h, rows[:3 * (3 * w + 1)] + b"\x07" + rows[3 * (3 * w + 1) + 1:]),
        "damaged zlib data.png": _png(w, h, None, idat=bytes(stream)),
        "flipped bit, stale CRC.png": bytes(flipped),
        "header of a bomb.png": _png(30000, 30000, b"\0" * 90001),
        "JPEG header of a bomb.jpg": b"\xff\xd8\xff\xc0" + struct.pack(">HBHHB", 11, 8, 60000, 60000, 1)
                                     + b"\x01\x11\x00\xff\xd9",
        "truncated.jpg": jpeg.getvalue()[:len(jpeg.getvalue()) // 2],
        "not an image.png": b"hello",
    }


@pytest.mark.parametrize("name,blob", _damaged_files().items(), ids=list(_damaged_files()))
def test_damaged_images_are_one_line_errors(tmp_path, name, blob):
    """Pillow decodes folder images: a damaged file or a decompression bomb is a DataError naming
    the file, never a crash or a huge allocation; both the decoder and the loader path say so."""
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(data.DataError) as e:
        data._FileReader(8, 3)(str(path))
    assert one_line(e.value) and str(path) in str(e.value)
    write_folder(tmp_path / "f", size=(8, 8))  # the same file inside a folder dataset
    (tmp_path / "f" / "train" / "dog" / name).write_bytes(blob)
    for in_memory in (True, False):
        with pytest.raises(data.DataError) as e:
            d = data.load_data("folder", tmp_path / "f", in_memory=in_memory)
            list(data.make_loader(d.train, mean=d.mean, std=d.std, batch_size=4, train=False, workers=0))
        assert one_line(e.value) and name in str(e.value)


def test_valid_png_decodes_exactly(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path = tmp_path / "ok.png"
    path.write_bytes(_png(8, 8, b"".join(b"\0" + row.tobytes() for row in a)))  # filter 0: raw rows
    assert torch.equal(data._FileReader(8, 3)(str(path)), torch.from_numpy(a).permute(2, 0, 1))


# ----------------------------------------------------------------------------- memory

def test_batches_and_images_too_big_for_memory(tmp_path):
    model = models.build_model("resnet20", 10, 3, SIZE)
    path = save_checkpoint(tmp_path / "ck" / "best.pt", model, name="resnet20", num_classes=10,
                           classes=data.DATASETS["synthetic"].classes)
    with pytest.raises(ValueError) as e:  # 10^12 images of 3x8x8: far beyond any machine
        evaluate_main(path, "--batch-size", 10 ** 12, "--out", tmp_path / "out")
    assert one_line(e.value) and "--batch-size" in str(e.value) and "memory" in str(e.value)
    with pytest.raises(ValueError) as e:
        export_main(path, "--benchmark", "--batch-sizes", 1, 10 ** 12, "--out", tmp_path / "m.onnx")
    assert one_line(e.value) and "memory" in str(e.value) and not (tmp_path / "m.onnx").exists()
    huge = save_checkpoint(tmp_path / "huge" / "best.pt", models.build_model("resnet20", 10, 3, 100_000),
                           name="resnet20", num_classes=10, image_size=100_000,
                           classes=data.DATASETS["synthetic"].classes)
    for run in (lambda: evaluate_main(huge, "--no-timing", "--out", tmp_path / "out"),
                lambda: export_main(huge, "--out", tmp_path / "h.onnx")):
        with pytest.raises(ValueError) as e:
            run()
        assert one_line(e.value) and "3x100000x100000" in str(e.value) and "memory" in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "h.onnx").exists()


def test_out_of_memory_during_the_pass_is_one_line(tmp_path, monkeypatch):
    model = models.build_model("resnet20", 10, 3, SIZE)
    path = save_checkpoint(tmp_path / "ck" / "best.pt", model, name="resnet20", num_classes=10,
                           classes=data.DATASETS["synthetic"].classes)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)\n"
                                     "See documentation for Memory Management")
    monkeypatch.setattr(ev, "evaluate", oom)
    r = run_script("evaluate.py", path, "--no-timing", "--out", tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: out of memory")
    assert "--batch-size" in lines[0]


def test_loader_benchmark_batch_larger_than_the_data():
    """The classic loader drops the partial batch: with no batch at all it used to spin forever."""
    args = bench.get_args_parser().parse_args(["--loader-only", "--dataset", "synthetic", "--batch-size",
                                               "100000", "--batches", "1", "--device", "cpu"])
    with pytest.raises(ValueError, match="larger than the 2560 training images") as e:
        bench.main(args)
    assert one_line(e.value)


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("name,stem", [("lenet5", None), ("alexnet", "cifar"), ("alexnet", "imagenet"),
                                       ("nin", "cifar"), ("nin", "imagenet"), ("googlenet", "cifar"),
                                       ("googlenet", "imagenet")])
def test_min_image_size_is_what_the_forward_needs(name, stem):
    options = {"stem": stem} if stem else {}
    need = models.min_image_size(name, 8, **options)
    with torch.device("meta"):
        ok = models.build_model(name, 10, 2, need, **options).eval()
        assert ok(torch.zeros(1, 2, need, need)).shape == (1, 10)
        below = models.MODELS[name](10, 2, need - 1, **options).eval()  # the class itself does not check
        with pytest.raises(RuntimeError):
            below(torch.zeros(1, 2, need - 1, need - 1))
    with pytest.raises(ValueError, match=f"at least {need}x{need} px") as e:
        models.build_model(name, 10, 2, need - 1, **options)
    assert one_line(e.value)


def test_models_cli_names_the_size_the_model_needs():
    with pytest.raises(ValueError, match="lenet5 needs images of at least 12x12 px") as e:
        models.main(models.get_args_parser().parse_args(["lenet5", "--in-channels", "2", "--image-size", "8"]))
    assert one_line(e.value)


# ----------------------------------------------------------------------------- flags

BAD_FLAGS = [
    (ev, ["ck.pt", "--batch-size", "0"], "--batch-size"),
    (export, ["ck.pt", "--threads", "-1"], "--threads"),
    (export, ["ck.pt", "--opset", "99"], "--opset"),
    (export, ["ck.pt", "--opset", "17"], "--opset"),
    (export, ["ck.pt", "--tolerance", "0"], "--tolerance"),
    (export, ["ck.pt", "--tolerance", "nan"], "--tolerance"),
    (export, ["ck.pt", "--tolerance=-1e-3"], "--tolerance"),
    (export, ["ck.pt", "--batch-sizes", "1", "0"], "--batch-sizes"),
    (export, ["ck.pt", "--warmup", "-1"], "--warmup"),
    (export, ["ck.pt", "--repeats", "0"], "--repeats"),
    (models, ["--image-size", "0"], "--image-size"),
    (models, ["--in-channels", "-3"], "--in-channels"),
    (models, ["--num-classes", "0"], "--num-classes"),
    (models, ["nosuch"], "MODEL"),
    (bench, ["--loader-only", "--batch-size", "0"], "--batch-size"),
    (bench, ["--loader-only", "--batches", "0"], "--batches"),
    (bench, ["--loader-only", "--classic-workers", "-1"], "--classic-workers"),
]


@pytest.mark.parametrize("module,argv,flag", BAD_FLAGS,
                         ids=[m.__name__ + " " + " ".join(a[a[0] == "ck.pt":]) for m, a, _ in BAD_FLAGS])
def test_out_of_range_flags_are_usage_errors(module, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        module.get_args_parser().parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[0].startswith("usage:")
    assert flag in err[-1] and ("must be" in err[-1] or "unknown model" in err[-1])


def test_opset_range_is_the_exporters(tmp_path, capsys):
    """--opset takes what the installed exporter writes: the newest one gives a file of exactly that
    opset that onnxruntime runs; one past it is a usage error (it used to export 18 silently)."""
    top = export.max_opset()
    with pytest.raises(SystemExit):
        export.get_args_parser().parse_args(["ck.pt", "--opset", str(top + 1)])
    assert f"must be in [18, {top}]" in capsys.readouterr().err
    model = models.build_model("lenet5", 10, 1, 28)
    path = save_checkpoint(tmp_path / "m.pt", model, name="lenet5", num_classes=10, in_channels=1,
                           image_size=28, classes=[str(i) for i in range(10)])
    export_main(path, "--opset", top)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert {o.domain: o.version for o in proto.opset_import}[""] == top
    x = torch.randn(3, 1, 28, 28)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    assert np.abs(sess.run(None, {"input": x.numpy()})[0] - ref).max() <= 1e-4 * np.abs(ref).max()
