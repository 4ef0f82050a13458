"""Datasets (the DATASETS registry), load-time preprocessing, augmentation and fast loaders.

    d = data.load_data("cifar10", "data")      # downloads what is missing, in torchvision's layout
    loader = data.make_loader(d.train, mean=d.mean, std=d.std, batch_size=128, train=True, augment="standard")

load_data() reads torchvision's on-disk layouts or an image folder (decoded by Pillow as predict.py
decodes it) into uint8 N x C x H x W splits; make_loader() serves them as augmented, normalized batches.
"""
import gzip
import hashlib
import importlib.util
import os
import pickle
import shutil
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from PIL import Image

from predict import GRAY_MODES, IMAGE_EXTENSIONS, PIL_ERRORS, PredictError, read_image  # one decoder
from runtime import cpu_count, ensure_fits, one_line, replacing

AUGMENTS = ("none", "standard", "strong", "autoaugment", "randaugment", "trivialaugment")
IN_MEMORY_LIMIT = 4 << 30  # folders above this many uint8 bytes use the dataloader path
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2560, 512
# torchvision's AutoAugment/RandAugment/TrivialAugment draw one operation per call for the whole
# tensor: they run per chunk of POLICY_CHUNK images, each chunk seeded from the epoch's plan
POLICY_CHUNK = 16
MNIST_KINDS = ("images-idx3", "labels-idx1")  # IDX files: kind and number of dimensions
CACHE_VERSION = 3  # 3: decoded by Pillow; the cache holds the sha256 of its images


class DataError(ValueError):
    """A user-facing data problem; the message is one line."""


@dataclass
class Split:
    images: Optional[torch.Tensor]  # uint8 N x C x H x W on the CPU, or None when file-backed
    labels: torch.Tensor  # int64 N
    files: Optional[list] = None  # file-backed only: the paths, and reader: path -> uint8 C x H x W
    reader: Optional[Callable] = None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):  # file-backed: what the dataloader path's workers load
        return self.reader(self.files[i]), self.labels[i]


@dataclass
class Data:
    name: str
    classes: list
    in_channels: int
    image_size: int
    mean: tuple
    std: tuple
    train: Split
    val: Optional[Split]
    test: Split

    @property
    def num_classes(self):
        return len(self.classes)


def _seed(*parts):
    """A 63-bit seed from any tuple of plain values (seed, epoch, stream, rank)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# torchvision's dataset classes define the layout and download (md5-checked); these parsers read it
# (torchvision's refuse all but the official bytes on load, and read no gzipped MNIST files).
def _path(root, rel):
    """rel or rel.gz (MNIST ships gzipped IDX files) under root, or None."""
    p = os.path.join(root, rel)
    return next((q for q in (p, p + ".gz") if os.path.isfile(q)), None)


def _corrupt(path, e):
    return DataError(f"cannot read {path}: {one_line(e)} (delete it to download it again)")


def _read_idx(path, ndim):
    """An IDX file (raw or .gz) of unsigned bytes: 0 0 8 ndim, ndim big-endian sizes, the bytes."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            buf = f.read()
        if buf[:4] != bytes([0, 0, 8, ndim]):
            raise ValueError(f"not an IDX file of {ndim}-D unsigned bytes")
        shape = np.frombuffer(buf, ">u4", ndim, 4).tolist()
        return torch.from_numpy(np.frombuffer(buf, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())
    except (OSError, EOFError, ValueError) as e:
        raise _corrupt(path, e) from None


def _read_mnist(folder, root, split):
    p = "t10k" if split == "test" else "train"
    x, y = (_read_idx(_path(root, f"{folder}/raw/{p}-{k}-ubyte"), int(k[-1])) for k in MNIST_KINDS)
    return x.unsqueeze(1), y.long()


def _refuse(what):
    raise DataError(f"refusing to unpickle {what}: CIFAR files hold only dicts, lists, strings and numpy "
                    "arrays (crafted file?)")


_RECONSTRUCT, _FROMBUFFER = np.ndarray.__reduce__(np.zeros(0))[0], np.zeros(1).__reduce_ex__(5)[0]
# Every global a CIFAR pickle needs: the official files (Python 2) name numpy.core's _reconstruct,
# ndarray and dtype; Python 3 pickles add _codecs.encode + bytes (protocol 2) or numpy._core's names.
# None of them runs code: an object array's items come from this unpickler too.
_CIFAR_GLOBALS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                  ("_codecs", "encode"): lambda s, *_: s.encode("latin1")}
for _m in ("core", "_core"):
    _CIFAR_GLOBALS[(f"numpy.{_m}.multiarray", "_reconstruct")] = _RECONSTRUCT
    _CIFAR_GLOBALS[(f"numpy.{_m}.numeric", "_frombuffer")] = _FROMBUFFER
for _m in ("builtins", "__builtin__"):
    _CIFAR_GLOBALS[(_m, "bytes")] = lambda *a: _refuse("bytes() with arguments") if a else b""


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global but _CIFAR_GLOBALS before it is looked up: a crafted file runs nothing."""

    def find_class(self, module, name):
        return _CIFAR_GLOBALS.get((module, name)) or _refuse(f"{module}.{name}")


def _read_cifar(folder, names, label_key, root, split):
    xs, ys = [], []
    for path in (os.path.join(root, folder, name) for name in names[split == "test"]):  # (train, test)
        try:
            with open(path, "rb") as f:
                d = _CifarUnpickler(f, encoding="latin1").load()
            xs.append(torch.from_numpy(np.asarray(d["data"], dtype=np.uint8)).view(-1, 3, 32, 32))
            ys.append(torch.as_tensor(d[label_key], dtype=torch.int64).view(-1))
        except Exception as e:  # _refuse's DataError, or whatever a damaged pickle raises
            raise (DataError(f"{path}: {e}") if isinstance(e, DataError) else _corrupt(path, e)) from None
    return torch.cat(xs), torch.cat(ys)


def _read_svhn(root, split):
    import scipy.io
    path = os.path.join(root, f"{split}_32x32.mat")
    try:
        m = scipy.io.loadmat(path)
        x = torch.from_numpy(np.ascontiguousarray(m["X"].transpose(3, 2, 0, 1)))  # HWCN -> NCHW
        if x.dtype != torch.uint8:
            raise ValueError(f"images {tuple(x.shape)} {x.dtype}, not uint8")
        return x, torch.from_numpy(m["y"].astype(np.int64)).view(-1) % 10  # the file labels 0 as 10
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        raise _corrupt(path, e) from None


def _synthetic(root, split):
    """Deterministic 10-class images, independent of the global RNG: each class's fixed low-frequency
    colour texture at a random circular shift (which hides it from a linear model; resnet20 learns it
    in two epochs, ~75%), with random contrast and pixel noise."""
    g = torch.Generator().manual_seed(20240611)
    p = torch.rand(10, 3, 4, 4, generator=g) * 2 - 1
    p = p - p.mean((2, 3), keepdim=True)
    p = p / p.abs().amax((1, 2, 3), keepdim=True)
    textures = F.interpolate(p, size=(32, 32), mode="bicubic", align_corners=False)  # 10 x 3 x 32 x 32
    out = []
    for n in (SYNTHETIC_TRAIN, SYNTHETIC_TEST):
        y = torch.randperm(n, generator=g) % 10
        shift = torch.randint(0, 32, (n, 2), generator=g)
        x = torch.stack([textures[c].roll((-a, -b), (1, 2)) for c, (a, b) in zip(y.tolist(), shift.tolist())])
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
        x = 128 + 80 * contrast * x + 25 * torch.randn(n, 3, 32, 32, generator=g)
        out.append((x.round().clamp(0, 255).to(torch.uint8), y))
    return out[1 if split == "test" else 0]  # the test set's draws follow the training set's


@dataclass(frozen=True)
class Spec:
    classes: Optional[tuple]  # None: inferred (folder)
    channels: Optional[int]
    size: Optional[int]
    mean: Optional[tuple]  # true per-channel statistics of the training split; None: computed
    std: Optional[tuple]
    files: tuple = ()  # the files read, relative to data_dir, in torchvision's layout
    read: Optional[Callable] = None  # (data_dir, "train" | "test") -> (uint8 N x C x H x W, int64 N)
    torchvision: Optional[Callable] = None  # the dataset class that downloads
    splits: tuple = ({"train": True}, {"train": False})  # its constructor arguments for train and test


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy
bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree
orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split())
CIFAR10_FILES = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])


def _mnist_like(cls, mean, std):
    files = tuple(f"{cls.__name__}/raw/{p}-{k}-ubyte" for p in ("train", "t10k") for k in MNIST_KINDS)
    return Spec(tuple(cls.classes), 1, 28, mean, std, files, partial(_read_mnist, cls.__name__), cls)


DATASETS = {
    "mnist": _mnist_like(tvd.MNIST, (0.1307,), (0.3081,)),
    "fashion-mnist": _mnist_like(tvd.FashionMNIST, (0.2860,), (0.3530,)),
    "kmnist": _mnist_like(tvd.KMNIST, (0.1918,), (0.3483,)),
    "cifar10": Spec(CIFAR10_CLASSES, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    tuple(f"cifar-10-batches-py/{f}" for f in sum(CIFAR10_FILES, [])),
                    partial(_read_cifar, "cifar-10-batches-py", CIFAR10_FILES, "labels"), tvd.CIFAR10),
    "cifar100": Spec(CIFAR100_CLASSES, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                     ("cifar-100-python/train", "cifar-100-python/test"),
                     partial(_read_cifar, "cifar-100-python", (["train"], ["test"]), "fine_labels"),
                     tvd.CIFAR100),
    "svhn": Spec(tuple("0123456789"), 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                 ("train_32x32.mat", "test_32x32.mat"), _read_svhn, tvd.SVHN,
                 ({"split": "train"}, {"split": "test"})),
    "folder": Spec(None, None, None, None, None),  # DIR/train/<class>/*, DIR/test/<class>/* (or val/)
    "synthetic": Spec(tuple(f"class{i}" for i in range(10)), 3, 32, None, None, read=_synthetic),
}


def _ensure_files(name, spec, root, download):
    if name == "svhn" and importlib.util.find_spec("scipy") is None:  # reads SVHN (also in its download)
        raise DataError("svhn: reading its .mat files needs scipy (pip install scipy)")
    missing = [os.path.join(root, f) for f in spec.files if _path(root, f) is None]
    if not missing:
        return
    near = [os.path.basename(p) for p in missing[1:]]  # a dataset's files share a folder
    where = f"expected {', '.join(missing[:1] + near)} (torchvision's layout)"
    if not download:
        raise DataError(f"{name} not found and download is off: {where}")
    try:
        os.makedirs(root, exist_ok=True)
        # torchvision fetches, md5-checks and unpacks into a temporary folder: only complete files move in
        with tempfile.TemporaryDirectory(prefix=".download-", dir=root, ignore_cleanup_errors=True) as tmp:
            for kwargs in spec.splits:
                spec.torchvision(tmp, download=True, **kwargs)
            for src in list(Path(tmp).rglob("*")):  # listed before anything moves
                dst = Path(root) / src.relative_to(tmp)
                if src.is_file() and not src.name.endswith((".tar.gz", ".tgz")) and not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with replacing(dst) as part:
                        shutil.move(src, part)
    except Exception as e:  # URLError, RuntimeError (torchvision), OSError, tarfile errors, ...
        why = f"{type(e).__name__}: {one_line(e, 150)}"
        raise DataError(f"{name}: download failed ({why}); {where}") from None
    if any(_path(root, f) is None for f in spec.files):
        raise DataError(f"{name}: download finished but {where}")


@dataclass
class _FileReader:
    """path -> uint8 C x H x W: decoded by predict.read_image, resized by torch's antialiased uint8
    resize (which predict.py reimplements), converted to `channels`."""
    size: int
    channels: Optional[int]

    def __call__(self, path):
        try:
            a = read_image(path)
        except PredictError as e:
            raise DataError(str(e)) from None
        img = torch.from_numpy(a.transpose(2, 0, 1).copy())
        if img.shape[-2:] != (self.size, self.size):
            img = TF.resize(img, [self.size, self.size], antialias=True)
        return _convert_channels(img, self.channels)


def _decode_all(files, reader):
    """uint8 N x C x H x W, decoded by threads (Pillow releases the GIL) into one preallocated tensor."""
    out = torch.empty(len(files), *reader(files[0]).shape, dtype=torch.uint8)
    with ThreadPoolExecutor(max(2, cpu_count())) as pool:
        list(pool.map(lambda i: out[i].copy_(reader(files[i])), range(len(files))))
    return out


def _cached_decode(root, folder, files, reader):
    """A split folder's images from root/.cache/<split>-<size>-<gray|rgb>-<key of the file list, sizes,
    mtimes>.pt, or decoded and cached there (older ones removed), with a sha256 that finds damage."""
    key = hashlib.sha256(f"v{CACHE_VERSION}\n".encode())
    for f in files:
        st = os.stat(f)
        key.update(f"{f[len(root):]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache, key, size, c = os.path.join(root, ".cache"), key.hexdigest()[:16], reader.size, reader.channels
    prefix = f"{os.path.basename(folder)}-{size}x{size}-{'gray' if c == 1 else 'rgb'}-"
    path, want = os.path.join(cache, f"{prefix}{key}.pt"), (len(files), c, size, size)
    digest = lambda x: hashlib.sha256(x.contiguous().numpy()).hexdigest()  # noqa: E731 (0.2 s per 150 MB)
    if os.path.exists(path):
        try:
            d = torch.load(path, weights_only=True)
            x = d["images"]
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and tuple(x.shape) == want):
                got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
                problem = f"it holds {got} {getattr(x, 'dtype', '')}, not uint8 {want}"
            elif d.get("sha256") != digest(x):
                problem = "its images do not match their checksum (damaged file)"
            else:
                return x
        except Exception as e:  # corrupt or foreign: decode again
            problem = f"unreadable ({one_line(e, 120)})"
        print(f"note: cache {path} is not usable: {problem}; decoding again", file=sys.stderr)
    print(f"decoding {len(files)} images (once; cached in {path})", flush=True)
    x = _decode_all(files, reader)
    try:
        os.makedirs(cache, exist_ok=True)
        with replacing(path) as tmp:
            torch.save({"images": x, "sha256": digest(x)}, tmp)
        for old in os.listdir(cache):
            if old.startswith(prefix) and old.endswith(".pt") and not old.startswith(prefix + key):
                os.remove(os.path.join(cache, old))
    except (OSError, RuntimeError) as e:  # read-only or full disk: work without the cache
        print(f"note: cannot write cache {path}: {one_line(e)}", file=sys.stderr)
    return x


def _load_folder(root, image_size, channels, in_memory):
    test = next((d for d in map(os.path.join, [root] * 2, ("test", "val")) if os.path.isdir(d)), None)
    dirs = [os.path.join(root, "train"), test]
    if not os.path.isdir(dirs[0]) or test is None:
        raise DataError(f"folder: expected {dirs[0]}/<class>/*.jpg|png and {root}/test/<class>/* (or val/)")
    found = [{c.name: sorted(f.path for f in os.scandir(c) if f.name.lower().endswith(IMAGE_EXTENSIONS))
              for c in os.scandir(d) if c.is_dir() and not c.name.startswith(".")} for d in dirs]
    # A class without training images would be an output the model never learns: an empty class
    # folder in train/ is dropped with a warning; test images of such a class are refused.
    classes, empty = ([c for c in sorted(found[0]) if bool(found[0][c]) == keep] for keep in (True, False))
    tested = [f"{c} ({len(f)})" for c, f in sorted(found[1].items()) if f and c not in classes]
    if tested:
        raise DataError(f"folder: class folder(s) {', '.join(tested)} of {test} have test images but no "
                        f"training images in {dirs[0]}: add training images or remove the class")
    if empty:
        print(f"warning: folder: dropping class folder(s) without images in {dirs[0]}: {', '.join(empty)}",
              file=sys.stderr)
    if len(classes) < 2:
        raise DataError(f"folder: {len(classes)} class folder(s) with images in {dirs[0]} "
                        f"({', '.join(classes)}); a classifier needs at least 2")
    splits = [(sum((f.get(c, []) for c in classes), []),
               torch.tensor([i for i, c in enumerate(classes) for _ in f.get(c, [])], dtype=torch.int64))
              for f in found]
    if not splits[1][0]:
        raise DataError(f"folder: no {'/'.join(IMAGE_EXTENSIONS)} images under {test}/<class>/")
    files, sizes, gray = splits[0][0], [], True  # from the headers of up to 1000 files spread over train/
    for f in dict.fromkeys(files[i] for i in np.linspace(0, len(files) - 1, 1000).astype(int)):
        try:
            with Image.open(f) as im:
                sizes.append(im.size[::-1])
                gray &= im.mode in GRAY_MODES
        except PIL_ERRORS as e:
            raise DataError(f"cannot read image {f}: {one_line(e)}") from None
    h, w = Counter(sizes).most_common(1)[0][0]
    if not image_size and h != w:
        raise DataError(f"folder: images are {h}x{w} (not square); choose an image size")
    size, native = image_size or h, 1 if gray else 3
    c, n = channels or native, len(splits[0][0]) + len(splits[1][0])
    in_memory = n * c * size * size <= IN_MEMORY_LIMIT if in_memory is None else in_memory
    ensure_fits((n if in_memory else 1) * max(c, native) * size * size, "cpu",
                f"{n if in_memory else 1} images at {size}x{size} px", "choose a smaller --image-size")
    if not in_memory:
        return classes, c, size, [Split(None, y, files, _FileReader(size, c)) for files, y in splits]
    xs = [_cached_decode(root, d, files, _FileReader(size, native)) for (files, _), d in zip(splits, dirs)]
    return classes, c, size, [Split(_convert_channels(x, c), y) for x, (_, y) in zip(xs, splits)]


def _convert_channels(x, channels):
    """uint8 ... x C x H x W: gray -> 3 by repetition, RGB -> 1 by Pillow's luminance (L = R 299/1000
    + G 587/1000 + B 114/1000, in Pillow's fixed point, so it equals Pillow's convert('L'))."""
    c = x.shape[-3]
    if channels is None or channels == c:
        return x
    if c == 1 and channels == 3:
        return x.repeat_interleave(3, dim=-3)
    if c != 3 or channels != 1:
        raise DataError(f"cannot convert {c}-channel images to {channels} channels (1 or 3)")
    w = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(3, 1, 1)
    return torch.cat([(((b.to(torch.int32) * w).sum(-3, keepdim=True) + 0x8000) >> 16).to(torch.uint8)
                      for b in x.split(1024)])  # in chunks: int32 copies of a whole split are large


def _stats(x):
    """Exact per-channel mean and std (0..1 scale) of uint8 N x C x H x W, from value histograms."""
    v = torch.arange(256, dtype=torch.float64) / 255
    h = [torch.bincount(c.reshape(-1), minlength=256).double() / c.numel() for c in x.unbind(1)]
    mean = [(p * v).sum() for p in h]
    return (tuple(m.item() for m in mean),
            tuple(((p * v.square()).sum() - m.square()).clamp_min(0).sqrt().item() for p, m in zip(h, mean)))


def _stratified(labels, seed):
    """All indices in an order (chosen by seed) whose every prefix holds each class in proportion."""
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    lab = labels[perm]
    counts = torch.bincount(lab)
    order = torch.argsort(lab, stable=True)  # grouped by class, shuffled inside each class
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[lab[order]]
    position = (rank.double() + 0.5) / counts[lab].double()  # evenly spread over [0, 1) per class
    return perm[torch.argsort(position, stable=True)]


def _subset(split, idx):  # the samples at idx, in split order
    idx = idx.sort().values
    return Split(split.images[idx] if split.images is not None else None, split.labels[idx],
                 [split.files[i] for i in idx.tolist()] if split.files is not None else None, split.reader)


def load_data(name, data_dir="data", *, image_size=None, channels=None, val_split=0.0,
              limit_train=None, limit_test=None, seed=0, download=True, in_memory=None):
    """Load a registered dataset as uint8 splits (see the module docstring). in_memory (folder only):
    None = by size (IN_MEMORY_LIMIT), False = file-backed (the dataloader path), True = decode all."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    root, spec = str(data_dir or "data"), DATASETS[name]
    if name == "folder":
        classes, c, size, (train, test) = _load_folder(root, image_size, channels, in_memory)
    else:
        _ensure_files(name, spec, root, download)
        (xtr, ytr), (xte, yte) = (spec.read(root, s) for s in ("train", "test"))
        if len(xtr) != len(ytr) or len(xte) != len(yte):
            raise DataError(f"{name} in {root}: the numbers of images and labels differ (delete the files to "
                            "download them again)")
        classes, c, size = list(spec.classes), channels or spec.channels, image_size or spec.size
        n = len(xtr) + len(xte)
        ensure_fits(n * max(c, xtr.shape[1]) * size * size, "cpu", f"{n} {name} images at {size}x{size} px",
                    "choose a smaller --image-size")
        if xtr.shape[-1] != size:  # antialiased bilinear, in chunks
            xtr, xte = (torch.cat([TF.resize(b, [size, size], antialias=True) for b in x.split(2048)])
                        for x in (xtr, xte))
        train, test = Split(_convert_channels(xtr, c), ytr), Split(_convert_channels(xte, c), yte)
    val = None
    if val_split:
        k = round(len(train) * val_split)
        if not 0 < k < len(train):
            raise DataError(f"val_split {val_split} of {len(train)} training images leaves an empty split")
        order = _stratified(train.labels, _seed(seed, "val"))
        val, train = _subset(train, order[:k]), _subset(train, order[k:])
    if spec.mean is not None and spec.channels in (1, c):  # gray repeated: the same statistics
        mean, std = spec.mean * (c // spec.channels), spec.std * (c // spec.channels)
    elif train.images is not None:  # folder, synthetic, RGB -> gray: the training split's own
        mean, std = _stats(train.images)
    else:  # file-backed folder: estimated on up to 2000 training images spread over the split
        idx = dict.fromkeys(np.linspace(0, len(train) - 1, min(2000, len(train))).astype(int).tolist())
        mean, std = _stats(_decode_all([train.files[i] for i in idx], train.reader))
    train, test = (_subset(s, _stratified(s.labels, _seed(seed, what))[:k]) if k and k < len(s) else s
                   for s, k, what in ((train, limit_train, "limit_train"), (test, limit_test, "limit_test")))
    return Data(name, classes, c, size, tuple(mean), tuple(std), train, val, test)


def match_classes(d, classes, source):
    """(`d` labelled in the order of `classes`, a model's from `source`; a note when they were reordered,
    else None). Other names than the data's are a DataError naming both lists."""
    classes, have = list(classes), list(d.classes)
    if have == classes:
        return d, None
    if sorted(have) != sorted(classes):  # the data's class names are unique: so are these then
        names = lambda v, k=12: f"[{', '.join(v[:k])}{f', ... ({len(v)} in all)' * (len(v) > k)}]"  # noqa
        only = (("the data", [c for c in have if c not in classes]),
                (source, [c for c in classes if c not in have]))
        diff = "; ".join(f"only in {w}: {names(v, 5)}" for w, v in only if v)
        raise DataError(f"class mismatch: {d.name} data has {len(have)} classes {names(have)} but {source} "
                        f"was trained on {len(classes)} {names(classes)}" + (f" ({diff})" if diff else ""))
    order = torch.tensor([classes.index(c) for c in have])  # data label -> model label
    splits = [s and Split(s.images, order[s.labels], s.files, s.reader) for s in (d.train, d.val, d.test)]
    return (Data(d.name, classes, d.in_channels, d.image_size, d.mean, d.std, *splits),
            f"{d.name} data lists the classes of {source} in another order; labels mapped by class name")


def crop_padding(size):  # the zero padding of the standard random crop: 4 px at 32 (CIFAR's), scaled
    return max(4, round(size / 8))


def _crop_flip(x, dy, dx, flip, pad):
    """Per-sample random crop of the zero-padded batch and horizontal flip, as one gather.
    x: uint8 B x C x H x W; dy, dx: B offsets in [0, 2 pad]; flip: B bool."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad)).view(B, C, -1)  # B x C x (H+2p)(W+2p)
    ar_h, ar_w = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    rows = dy[:, None] + ar_h  # B x H
    cols = dx[:, None] + torch.where(flip[:, None], W - 1 - ar_w, ar_w)  # B x W
    src = (rows[:, :, None] * (W + 2 * pad) + cols[:, None, :]).view(B, 1, H * W)  # B x 1 x HW
    return xp.gather(2, src.expand(B, C, H * W)).view(B, C, H, W)


def _strong(x, u):
    """The 'strong' preset with per-sample parameters u (B x 10 uniforms): random-resized-crop (area
    35-100%, aspect 3/4-4/3), rotation up to 15 degrees and flip as one affine warp, then brightness,
    contrast, saturation (0.6-1.4) and sharpness 2 (p 0.5). uint8 B x C x H x W -> float 0..255."""
    B, C, H, W = x.shape
    gray = lambda x: (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if C == 3 else x  # noqa
    area = 0.35 + 0.65 * u[:, 0]
    ratio = torch.exp((2 * u[:, 1] - 1) * np.log(4 / 3))
    sw, sh = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    angle = (2 * u[:, 4] - 1) * np.pi / 12
    flip = torch.where(u[:, 5] < 0.5, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * sw * flip, -sin * sh, (2 * u[:, 2] - 1) * (1 - sw)], 1),
                         torch.stack([sin * sw * flip, cos * sh, (2 * u[:, 3] - 1) * (1 - sh)], 1)], 1)
    grid = F.affine_grid(theta, [B, C, H, W], align_corners=False)  # B x H x W x 2
    x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    f = (0.6 + 0.8 * u[:, 6:9])[:, :, None, None]  # B x 3 x 1 x 1
    x = (x * f[:, 0:1]).clamp_(0, 255)
    m = gray(x).mean((1, 2, 3), keepdim=True)
    x = ((x - m) * f[:, 1:2] + m).clamp_(0, 255)
    if C == 3:
        x = ((x - gray(x)) * f[:, 2:3] + gray(x)).clamp_(0, 255)
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    blur = x.clone()  # torchvision's sharpness: the smoothed image, borders kept
    blur[:, :, 1:-1, 1:-1] = F.conv2d(x.reshape(B * C, 1, H, W), kernel[None, None]).view(B, C, H - 2, W - 2)
    return torch.where(u[:, 9, None, None, None] < 0.5, (blur + 2 * (x - blur)).clamp_(0, 255), x)


class Loader:
    """(x, y) batches on the device, from the split moved there as one uint8 tensor (the tensor path) or
    from DataLoader workers for a file-backed folder (the dataloader path), augmented per sample in
    batched ops and normalized there; an epoch's randomness is a pure function of (seed, epoch, rank).
    train: shuffled, augmented, sharded by rank, full batches only (or one when the shard is smaller);
    else everything in order. image_size: resize the batches to it (default: the split's size)."""

    def __init__(self, split, *, mean, std, batch_size, train, augment="none", cutout=0, device="cpu",
                 seed=0, channels_last=False, rank=0, world_size=1, workers=4, image_size=None):
        self.device, self.train, self.batch_size, self.seed = torch.device(device), train, batch_size, seed
        self.augment, self.cutout = (augment or "none", cutout) if train else ("none", 0)
        self.rank, self.world_size = rank, world_size if train else 1
        self.channels_last, self.epoch = channels_last, 0
        self.total, n = len(split), len(split) // self.world_size  # samples per rank
        if n == 0:
            raise DataError(f"a split of {self.total} images cannot feed {world_size} processes")
        self.num_samples = n if not train or n < batch_size else n - n % batch_size
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
                               for v in (mean, std))
        policies = {"autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
                    "randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}
        self.policy = policies[self.augment]() if self.augment in policies else None
        self.on_device = split.images is not None
        if self.on_device:  # tensor path: the whole split moves to the device once
            self.images, self.labels = split.images.to(self.device), split.labels.to(self.device)
        else:  # dataloader path: the sampler is the epoch's order, set in __iter__
            self._order = []
            self._dl = torch.utils.data.DataLoader(split, batch_size=batch_size, sampler=self._order,
                                                   num_workers=workers, pin_memory=self.device.type == "cuda",
                                                   persistent_workers=workers > 0)
        self.size = split.images.shape[-1] if self.on_device else split.reader.size
        self.image_size = image_size or self.size

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch):  # the next pass is epoch `epoch` (without calls, passes count up from 0)
        self.epoch = epoch

    def _draw(self, epoch):
        """This epoch's sample order and augmentation parameters, drawn on the CPU."""
        if not self.train:
            return torch.arange(self.num_samples), {}
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, "order"))  # the same for all ranks
        # Interleaved shards: rank r takes every world_size-th sample, so the ranks' batches
        # b together are exactly global batch b of a single-process run with the same seed.
        order = torch.randperm(self.total, generator=g)[self.rank::self.world_size][:self.num_samples]
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, "augment", self.rank))
        n, p, pad = self.num_samples, {}, crop_padding(self.size)
        if self.augment == "standard" or self.policy is not None:
            p["dy"], p["dx"] = (torch.randint(0, 2 * pad + 1, (n,), generator=g) for _ in "yx")
            p["flip"] = torch.rand(n, generator=g) < 0.5
            if self.policy is not None:
                p["policy"] = torch.randint(2 ** 62, (n,), generator=g)  # per chunk, on the CPU
        elif self.augment == "strong":
            p["u"] = torch.rand(n, 10, generator=g)
        if self.cutout:
            p["cut"] = torch.rand(n, 2, generator=g)
        return order, p

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        order, p = self._draw(epoch)
        dev = {k: v.to(self.device, non_blocking=True) for k, v in p.items() if k != "policy"}
        if not self.on_device:
            self._order[:], batches = order.tolist(), self._dl
        else:
            batches = ((self.images.index_select(0, i), self.labels.index_select(0, i))
                       for i in order.to(self.device).split(self.batch_size))
        try:
            for b, (x, y) in enumerate(batches):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                s = slice(b * self.batch_size, b * self.batch_size + len(x))
                if "dy" in dev:
                    x = _crop_flip(x, dev["dy"][s], dev["dx"][s], dev["flip"][s], crop_padding(self.size))
                if "policy" in p:
                    with torch.random.fork_rng(devices=[]):
                        for j in range(0, len(x), POLICY_CHUNK):
                            torch.random.default_generator.manual_seed(int(p["policy"][s.start + j]))
                            x[j:j + POLICY_CHUNK] = self.policy(x[j:j + POLICY_CHUNK])
                if "u" in dev:
                    x = _strong(x, dev["u"][s])
                yield self._finish(x, dev["cut"][s] if "cut" in dev else None), y
        except DataError as e:  # raised in a worker: keep the last line, the original message
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None

    def _finish(self, x, cut):
        """uint8 (or float 0..255) batch -> resized, normalized, cut out, in the memory format."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = TF.resize(x, [self.image_size, self.image_size], antialias=True)
        x = x.float().div_(255).sub_(self.mean).div_(self.std)
        if cut is not None:  # cutout: a square of side `cutout` around a random centre, zeroed
            H, W = x.shape[-2:]
            r = torch.arange(H, device=x.device) - (cut[:, :1] * H).long() + self.cutout // 2  # B x H
            c = torch.arange(W, device=x.device) - (cut[:, 1:] * W).long() + self.cutout // 2  # B x W
            x = x.masked_fill_(((r >= 0) & (r < self.cutout))[:, None, :, None]
                               & ((c >= 0) & (c < self.cutout))[:, None, None, :], 0.0)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


make_loader = Loader
