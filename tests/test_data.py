"""data.py: real on-disk formats (self-made fixtures), both loader paths, splits, errors.

    python -m pytest -q tests/test_data.py
"""
import dataclasses
import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import run_script

REPO = Path(__file__).resolve().parent.parent
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # no network, fast


def rng(seed):
    return np.random.default_rng(seed)


def write_idx(path, arr, gz):
    arr = np.asarray(arr, dtype=np.uint8)
    blob = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(blob)


def write_cifar(root, name, n_train=50, n_test=20, classes=10):
    """CIFAR-10 (5 train batches) or CIFAR-100 pickles: dicts of a uint8 N x 3072 array + labels."""
    r = rng(1)
    x = r.integers(0, 256, (n_train + n_test, 3072), dtype=np.uint8)
    y = (np.arange(n_train + n_test) % classes).tolist()
    if name == "cifar10":
        folder, key, files = root / "cifar-10-batches-py", "labels", [f"data_batch_{i}" for i in range(1, 6)]
        chunks = np.array_split(np.arange(n_train), 5)
    else:
        folder, key, files, chunks = root / "cifar-100-python", "fine_labels", ["train"], [np.arange(n_train)]
    folder.mkdir(parents=True, exist_ok=True)
    test = ("test_batch" if name == "cifar10" else "test", np.arange(n_train, n_train + n_test))
    for f, idx in list(zip(files, chunks)) + [test]:
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": x[idx], key: [y[i] for i in idx], "batch_label": f}, fh, protocol=2)
    return x, np.array(y), n_train


def write_folder(root, classes=("cat", "dog", "frog"), n_train=8, n_test=3, size=(32, 32), mode="RGB",
                 ext="png"):
    """DIR/train/<class>/i.png and DIR/test/<class>/i.png written by PIL; returns the arrays."""
    r, out = rng(2), {}
    for split, n in (("train", n_train), ("test", n_test)):
        xs, ys = [], []
        for label, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (*size, 3) if mode == "RGB" else size
                a = r.integers(1, 256, shape, dtype=np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i:03d}.{ext}")
                xs.append(a.transpose(2, 0, 1) if mode == "RGB" else a[None])
                ys.append(label)
        out[split] = (np.stack(xs) if xs else None, np.array(ys))
    return out


def one_line(msg):
    return "\n" not in str(msg).strip()


# ----------------------------------------------------------------------------- registry, formats

def test_registry():
    assert set(data.DATASETS) == {"mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100", "svhn", "folder",
                                  "synthetic"}
    assert data.AUGMENTS == ("none", "standard", "strong", "autoaugment", "randaugment", "trivialaugment")
    assert data.DATASETS["cifar10"].std == (0.2470, 0.2435, 0.2616)
    assert data.DATASETS["cifar10"].mean == (0.4914, 0.4822, 0.4465)
    c100 = data.DATASETS["cifar100"].classes
    assert len(set(c100)) == 100 and list(c100) == sorted(c100)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"),
                                         ("kmnist", "KMNIST")])
def test_mnist_family_idx_raw_and_gz(tmp_path, name, folder):
    r = rng(0)
    xtr, ytr = r.integers(0, 256, (30, 28, 28)), np.arange(30) % 10
    xte, yte = r.integers(0, 256, (20, 28, 28)), (np.arange(20) * 3) % 10
    raw = tmp_path / folder / "raw"
    write_idx(raw / "train-images-idx3-ubyte", xtr, gz=False)  # unpacked, as torchvision leaves it
    write_idx(raw / "train-labels-idx1-ubyte", ytr, gz=False)
    write_idx(raw / "t10k-images-idx3-ubyte", xte, gz=True)  # still gzipped, as downloaded
    write_idx(raw / "t10k-labels-idx1-ubyte", yte, gz=True)
    d = data.load_data(name, tmp_path, download=False)
    assert (d.in_channels, d.image_size, d.num_classes) == (1, 28, 10)
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape == (30, 1, 28, 28)
    assert np.array_equal(d.train.images[:, 0].numpy(), xtr)
    assert np.array_equal(d.test.images[:, 0].numpy(), xte)
    assert d.train.labels.dtype == torch.int64 and np.array_equal(d.test.labels.numpy(), yte)
    assert d.mean == data.DATASETS[name].mean and len(d.classes) == 10
    d3 = data.load_data(name, tmp_path, download=False, image_size=32, channels=3)
    assert d3.train.images.shape == (30, 3, 32, 32) and (d3.in_channels, d3.image_size) == (3, 32)
    assert torch.equal(d3.train.images[:, 0], d3.train.images[:, 2])
    assert d3.std == data.DATASETS[name].std * 3


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    x, y, n = write_cifar(tmp_path, name, classes=10 if name == "cifar10" else 100)
    d = data.load_data(name, tmp_path, download=False)  # md5s differ from the official files
    assert d.train.images.shape == (n, 3, 32, 32) and len(d.test) == len(x) - n
    img = d.train.images.numpy()
    for i, c, h, w in [(0, 0, 0, 0), (7, 1, 5, 30), (49, 2, 31, 31), (13, 2, 17, 4)]:
        assert img[i, c, h, w] == x[i, c * 1024 + h * 32 + w]  # CIFAR: 1024 R, then G, then B, rows
    assert np.array_equal(d.test.labels.numpy(), y[n:])
    assert d.num_classes == (10 if name == "cifar10" else 100)
    g = data.load_data(name, tmp_path, download=False, channels=1)  # RGB -> luminance, as PIL's 'L'
    ref = [np.asarray(Image.fromarray(x[i].reshape(3, 32, 32).transpose(1, 2, 0)).convert("L"))
           for i in range(n)]
    assert np.array_equal(g.train.images[:, 0].numpy(), np.stack(ref))
    assert g.mean[0] == pytest.approx(np.stack(ref).mean() / 255, abs=1e-9)
    assert g.std[0] == pytest.approx(np.stack(ref).std() / 255, abs=1e-9)


def test_svhn_mat(tmp_path):
    sio = pytest.importorskip("scipy.io")
    r = rng(3)
    X = r.integers(0, 256, (32, 32, 3, 12), dtype=np.uint8)  # H x W x C x N, labels 1..10 (10 = digit 0)
    y = (np.arange(12) % 10 + 1).reshape(-1, 1)
    for f in ("train_32x32.mat", "test_32x32.mat"):
        sio.savemat(tmp_path / f, {"X": X, "y": y})
    d = data.load_data("svhn", tmp_path, download=False)
    assert d.train.images.shape == (12, 3, 32, 32)
    assert d.train.images[5, 2, 7, 9] == X[7, 9, 2, 5]
    assert d.train.labels.tolist() == [(i % 10 + 1) % 10 for i in range(12)]


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name,expected", [("cifar10", "cifar-10-batches-py/data_batch_1"),
                                           ("cifar100", "cifar-100-python/train"),
                                           ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
                                           ("svhn", "train_32x32.mat")])
def test_missing_files_one_line(tmp_path, name, expected):
    with pytest.raises(data.DataError) as e:
        data.load_data(name, tmp_path, download=False)
    assert expected in str(e.value) and str(tmp_path) in str(e.value) and one_line(e.value)


def test_corrupt_file(tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="data_batch_3") as e:
        data.load_data("cifar10", tmp_path, download=False)
    assert one_line(e.value)
    for f, shape in (("train-images-idx3", (2, 28, 28)), ("train-labels-idx1", (2,)),
                     ("t10k-images-idx3", (2, 28, 28)), ("t10k-labels-idx1", (2,))):
        write_idx(tmp_path / f"MNIST/raw/{f}-ubyte", np.zeros(shape), gz=False)
    (tmp_path / "MNIST/raw/train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + b"\0" * 20)  # truncated
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte"):
        data.load_data("mnist", tmp_path, download=False)


def test_cli_offline_download_fails_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    p = run_script("train.py", "--model", "lenet5", "--dataset", "cifar10", "--data-dir", empty, env=OFFLINE)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and one_line(p.stderr) and p.stderr.startswith("error: ")
    assert "download failed" in p.stderr and "cifar-10-batches-py/data_batch_1" in p.stderr
    assert [f.name for f in empty.iterdir()] == []  # nothing half-downloaded left behind


def test_download_moves_complete_files_into_place(tmp_path, monkeypatch):
    """torchvision's class downloads into a temporary folder; only its unpacked files move into the
    data dir (the archive and the temporary folder do not), and a file already there is kept."""
    def fake_cifar10(root, download, train):  # what torchvision.datasets.CIFAR10 leaves behind
        write_cifar(Path(root), "cifar10")
        (Path(root) / "cifar-10-batches-py" / "readme.html").write_text("theirs")
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"archive")
    spec = dataclasses.replace(data.DATASETS["cifar10"], torchvision=fake_cifar10)
    monkeypatch.setitem(data.DATASETS, "cifar10", spec)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "readme.html").write_text("mine")
    d = data.load_data("cifar10", tmp_path)
    assert len(d.train) == 50 and len(d.test) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]
    assert (tmp_path / "cifar-10-batches-py" / "readme.html").read_text() == "mine"


def test_bad_arguments():
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load_data("imagenet9000")
    with pytest.raises(data.DataError, match="val_split"):
        data.load_data("synthetic", val_split=0.0001)  # 0 of 2560 images


# ----------------------------------------------------------------------------- folders

def test_folder_pixels_labels_stats(tmp_path):
    ref = write_folder(tmp_path)
    d = data.load_data("folder", tmp_path)
    assert d.classes == ["cat", "dog", "frog"] and (d.in_channels, d.image_size) == (3, 32)
    assert np.array_equal(d.train.images.numpy(), ref["train"][0])  # lossless PNG round trip
    assert np.array_equal(d.test.labels.numpy(), ref["test"][1])
    x = ref["train"][0].astype(np.float64) / 255
    assert np.allclose(d.mean, x.mean((0, 2, 3)), atol=1e-9)
    assert np.allclose(d.std, x.std((0, 2, 3)), atol=1e-9)


def test_folder_mixed_sizes_gray_and_val_dir(tmp_path):
    write_folder(tmp_path, mode="L", n_train=4)
    Image.fromarray(np.full((20, 44), 200, np.uint8)).save(tmp_path / "train" / "dog" / "odd.png")
    os.rename(tmp_path / "test", tmp_path / "val")
    d = data.load_data("folder", tmp_path)
    assert (d.in_channels, d.image_size) == (1, 32) and d.train.images.shape == (13, 1, 32, 32)
    assert (d.train.images[d.train.labels == 1][-1] == 200).all()  # resized to the common size
    d3 = data.load_data("folder", tmp_path, channels=3, image_size=16)
    assert d3.train.images.shape == (13, 3, 16, 16) and len(d3.test) == 9


def test_folder_cache(tmp_path, monkeypatch):
    write_folder(tmp_path)
    first = data.load_data("folder", tmp_path)
    cached = sorted(p.name for p in (tmp_path / ".cache").iterdir())
    assert len(cached) == 2 and all(c.endswith(".pt") for c in cached)  # train + test, no temp files
    monkeypatch.setattr(data, "_decode_all", lambda *a: pytest.fail("decoded again"))
    again = data.load_data("folder", tmp_path)
    assert torch.equal(first.train.images, again.train.images)
    monkeypatch.undo()
    write_folder(tmp_path / "x", n_train=1, n_test=0)
    os.rename(tmp_path / "x" / "train" / "cat" / "000.png", tmp_path / "train" / "cat" / "zzz.png")
    assert len(data.load_data("folder", tmp_path).train) == len(first.train) + 1  # new file list
    assert len(list((tmp_path / ".cache").iterdir())) == 2  # the stale train cache was replaced


def test_folder_test_class_without_training_images(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "test" / "bird").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "test" / "bird" / "0.png")
    with pytest.raises(data.DataError, match=r"bird \(1\) of .*test have test images but no training") as e:
        data.load_data("folder", tmp_path)
    assert one_line(e.value)
    (tmp_path / "test" / "bird" / "0.png").unlink()  # an empty one holds nothing to score: ignored
    assert data.load_data("folder", tmp_path).classes == ["cat", "dog", "frog"]


def test_folder_missing(tmp_path):
    with pytest.raises(data.DataError, match="train/<class>") as e:
        data.load_data("folder", tmp_path)
    assert one_line(e.value)


# ----------------------------------------------------------------------------- loaders

def split_of(n=300, c=3, size=32, seed=0):
    """Random images (values 1..255, so zeros can only come from cutout); labels = sample ids."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, c, size, size), dtype=torch.uint8, generator=g)
    return data.Split(images, torch.arange(n))


def to_uint8(x):
    return (x * 255).round().to(torch.uint8)  # undo normalization with mean 0, std 1


def test_tensor_path_shapes_and_batches():
    s = split_of(300)
    L = data.make_loader(s, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=64, train=True, augment="standard",
                         channels_last=True)
    batches = list(L)
    assert len(L) == len(batches) == 4 and L.num_samples == 256  # drop_last
    x, y = batches[0]
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert len(torch.cat([b[1] for b in batches]).unique()) == 256
    E = data.make_loader(s, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=64, train=False, augment="strong")
    xs, ys = zip(*E)
    assert len(E) == 5 and [len(v) for v in ys] == [64] * 4 + [44]
    assert torch.equal(torch.cat(ys), torch.arange(300))
    assert torch.equal(to_uint8(torch.cat(xs)), s.images)  # evaluation: never augmented
    small = data.make_loader(split_of(10), mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=64, train=True)
    assert len(small) == 1 and len(next(iter(small))[1]) == 10  # smaller than a batch: kept
    R = data.make_loader(s, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=64, train=False, image_size=48)
    assert next(iter(R))[0].shape == (64, 3, 48, 48)


def test_crop_flip_is_per_sample_and_matches_reference():
    s = split_of(256)
    L = data.make_loader(s, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=128, train=True, augment="standard")
    padded = np.pad(s.images.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))
    # N x 3 x 9 x 9 x 32 x 32
    windows = np.lib.stride_tricks.sliding_window_view(padded, (32, 32), axis=(2, 3))
    found, flips = set(), []
    for epoch in range(4):
        L.set_epoch(epoch)
        for x, y in L:
            for img, i in zip(to_uint8(x).numpy(), y.tolist()):
                crops = windows[i].transpose(1, 2, 0, 3, 4)  # 9 x 9 x 3 x 32 x 32: every padded crop
                hits = [(dy, dx, f) for f, ref in enumerate((crops, crops[..., ::-1]))
                        for dy, dx in zip(*np.nonzero((ref == img).all((2, 3, 4))))]
                assert len(hits) == 1  # a crop of the zero-padded image, maybe flipped
                found.add(hits[0])
                flips.append(hits[0][2])
    assert len(found) > 100  # per-sample parameters
    assert 0.44 < np.mean(flips) < 0.56  # 1024 draws of p = 0.5


def test_set_epoch_reproducible_and_sharded():
    s = split_of(150)
    kw = dict(mean=(0.5,) * 3, std=(0.2,) * 3, batch_size=50, train=True, cutout=8)
    for aug in data.AUGMENTS:
        a, b = data.make_loader(s, augment=aug, seed=1, **kw), data.make_loader(s, augment=aug, seed=1, **kw)
        a.set_epoch(3), b.set_epoch(3)
        ea, eb = list(a), list(b)  # a fresh loader replays the epoch (resume)
        assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(ea, eb))
        assert all(torch.isfinite(p[0]).all() and p[0].shape == (50, 3, 32, 32) for p in ea)
        b.set_epoch(4)
        assert not torch.equal(ea[0][0], next(iter(b))[0])
    shards = [torch.cat([y for _, y in data.make_loader(s, rank=r, world_size=3, **kw)]) for r in range(3)]
    assert [len(v) for v in shards] == [50] * 3 and len(torch.cat(shards).unique()) == 150


def test_cutout_squares():
    L = data.make_loader(split_of(64), mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=64, train=True, cutout=10)
    x, _ = next(iter(L))
    zero = x == 0
    assert torch.equal(zero[:, 0], zero[:, 2])  # one square for all channels
    n = zero[:, 0].sum((1, 2))
    assert (n >= 25).all() and (n <= 100).all() and (n == 100).float().mean() > 0.3


def test_tensor_and_dataloader_paths_agree(tmp_path):
    write_folder(tmp_path, n_train=20, ext="jpg")
    mem = data.load_data("folder", tmp_path)
    disk = data.load_data("folder", tmp_path, in_memory=False)
    assert mem.train.images is not None and disk.train.images is None and len(disk.train.files) == 60
    assert disk.mean == mem.mean and (disk.in_channels, disk.image_size) == (3, 32)
    for train, augment in ((False, "none"), (True, "none"), (True, "standard"), (True, "strong"),
                           (True, "autoaugment")):
        kw = dict(mean=mem.mean, std=mem.std, batch_size=16, train=train, augment=augment, cutout=5 * train,
                  seed=5)
        a, b = data.make_loader(mem.train, **kw), data.make_loader(disk.train, workers=0, **kw)
        pa, pb = list(a), list(b)  # the same augmentation, drawn the same way, on both paths
        assert len(pa) == len(pb) == len(a) and len(a) == (3 if train else 4)
        assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(pa, pb))


def test_dataloader_path_augments_and_workers(tmp_path):
    write_folder(tmp_path, n_train=6)
    d = data.load_data("folder", tmp_path, in_memory=False)
    kw = dict(mean=d.mean, std=d.std, batch_size=8, train=True, channels_last=True)
    for aug in data.AUGMENTS:
        x, y = next(iter(data.make_loader(d.train, augment=aug, workers=0, **kw)))
        assert x.shape == (8, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    one = data.make_loader(d.train, augment="standard", cutout=6, workers=0, **kw)
    two = data.make_loader(d.train, augment="standard", cutout=6, workers=2, **kw)
    one.set_epoch(2), two.set_epoch(2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(one, two))  # independent of worker count


# ----------------------------------------------------------------------------- splits, synthetic

def test_val_split_and_limits():
    d = data.load_data("synthetic", val_split=0.1, seed=3)
    assert len(d.val) == 256 and len(d.train) == 2304
    assert set(torch.bincount(d.val.labels).tolist()) == {25, 26}  # 10% of 256 per class
    where = {img.numpy().tobytes(): i for i, img in enumerate(data.load_data("synthetic").train.images)}
    idx = lambda part: {where[img.numpy().tobytes()] for img in part.images}  # noqa: E731
    vi, ti = idx(d.val), idx(d.train)
    assert not vi & ti and len(vi | ti) == 2560
    again, other = (data.load_data("synthetic", val_split=0.1, seed=s) for s in (3, 4))
    assert torch.equal(again.val.images, d.val.images) and not torch.equal(other.val.images, d.val.images)
    small = data.load_data("synthetic", val_split=0.1, limit_train=100, limit_test=50, seed=3)
    assert len(small.train) == 100 and len(small.test) == 50 and len(small.val) == 256
    assert torch.bincount(small.train.labels).tolist() == [10] * 10
    assert torch.bincount(small.test.labels).tolist() == [5] * 10
    assert idx(small.train) <= ti


def test_synthetic_deterministic_and_options():
    torch.manual_seed(123)
    a = data.load_data("synthetic")
    torch.manual_seed(456)
    b = data.load_data("synthetic", channels=1, image_size=28)
    assert a.train.images.shape == (data.SYNTHETIC_TRAIN, 3, 32, 32) and len(a.test) == data.SYNTHETIC_TEST
    assert b.train.images.shape == (data.SYNTHETIC_TRAIN, 1, 28, 28) and b.in_channels == 1
    assert torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.train.images, data.load_data("synthetic").train.images)
    assert torch.bincount(a.train.labels).tolist() == [256] * 10 and a.num_classes == 10


def test_strong_warp_reference():
    x = split_of(4).images
    u = torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.9]).repeat(4, 1)  # identity parameters
    assert torch.allclose(data._strong(x, u), x.float(), atol=1e-3)
    u[:2, 5] = 0.1  # flip the first two
    assert torch.allclose(data._strong(x, u)[:2], x[:2].flip(3).float(), atol=1e-3)
    u[:, 6] = 0.0  # brightness factor 0.6
    assert torch.allclose(data._strong(x, u)[2:], 0.6 * x[2:].float(), atol=1e-3)
