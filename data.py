"""Datasets (the DATASETS registry), load-time preprocessing, augmentation and fast loaders.

    python data.py --dataset cifar10                     # load (download if missing), print a summary
    python bench.py --loader-only --dataset folder --data-dir /tmp/cifar10-jpeg   # vs the classic pipeline

load_data() returns a Data of uint8 splits (N x C x H x W) in torchvision's on-disk layouts.
make_loader() then picks one of two paths:
  tensor path      the split sits on the training device as one uint8 tensor; each batch is
                   gathered, augmented with per-sample random parameters in batched tensor ops
                   and normalized there (no per-image Python, no host sync per batch).
  dataloader path  folders too big for memory: worker processes decode the files of each batch,
                   which is then augmented and normalized on the device as on the tensor path.
All randomness of an epoch is a pure function of (seed, epoch, rank): set_epoch(e) replays it.
Folder images are decoded by Pillow as predict.py decodes them: both see the same pixels.
"""
import argparse
import gzip
import hashlib
import os
import pickle
import shutil
import struct
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

from runtime import cpu_count, ensure_fits, one_line, replacing, run_cli

AUGMENTS = ("none", "standard", "strong", "autoaugment", "randaugment", "trivialaugment")
IN_MEMORY_LIMIT = 4 << 30  # folders above this many uint8 bytes use the dataloader path
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2560, 512
POLICY_CHUNK = 16  # tensor path: one AutoAugment/RandAugment/TrivialAugment draw per 16 images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # Pillow modes read as 1 channel
PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # Pillow on a bad file
CACHE_VERSION = 3  # 3: decoded by Pillow; the cache holds the sha256 of its images


class DataError(ValueError):
    """A user-facing data problem; the message is one line."""


@dataclass
class Split:
    images: Optional[torch.Tensor]  # uint8 N x C x H x W on the CPU, or None when file-backed
    labels: torch.Tensor  # int64 N
    files: Optional[list] = None  # file-backed folder only
    reader: Optional[Callable] = None  # file-backed: path -> uint8 C x H x W, ready to augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):  # file-backed: (uint8 C x H x W, label), for the dataloader path's workers
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


# ----------------------------------------------------------------------------- file readers
# torchvision's dataset classes define the layout and download (md5-checked). We read with the
# parsers below: torchvision's CIFAR/SVHN check every file's md5 on load (refusing anything but
# the official bytes, so tests could not use them) and its MNIST reads only unpacked IDX files.

def _path(root, rel):
    """rel or rel.gz (MNIST ships gzipped IDX files) under root, or None."""
    return next((p for p in (os.path.join(root, rel), os.path.join(root, rel) + ".gz") if os.path.isfile(p)), None)


def _corrupt(path, e):
    return DataError(f"cannot read {path}: {one_line(e)} (delete it to download it again)")


def _read_idx(path):
    """An IDX file (raw or .gz) of unsigned bytes -> uint8 tensor of its shape."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            buf = f.read()
        if len(buf) < 4 or buf[:3] != b"\0\0\x08":
            raise ValueError("not an IDX file of unsigned bytes")
        shape = struct.unpack(f">{buf[3]}I", buf[4:4 + 4 * buf[3]])
        return torch.from_numpy(np.frombuffer(buf, np.uint8, offset=4 + 4 * buf[3]).reshape(shape).copy())
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise _corrupt(path, e) from None


def _read_mnist(folder, root):
    out = []
    for p in ("train", "t10k"):
        x, y = (_read_idx(_path(root, f"{folder}/raw/{p}-{k}-ubyte")) for k in ("images-idx3", "labels-idx1"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{root}/{folder}/raw/{p}-*: images {tuple(x.shape)} do not match labels {tuple(y.shape)}")
        out += [x.unsqueeze(1), y.long()]
    return out


class _Unsafe(pickle.UnpicklingError):
    """A pickle naming something the CIFAR files never contain (it could run code)."""


def _refuse(what):
    raise _Unsafe(f"refusing to unpickle {what}: CIFAR files hold only dicts, lists, strings and numpy "
                  "arrays (crafted file?)")


def _np_dtype(*args):
    d = np.dtype(*args)
    return _refuse(f"a numpy array of Python objects (dtype {d})") if d.hasobject else d


def _latin1(s, encoding="utf-8", errors="strict"):  # how Python 3's protocol 2 writes bytes
    if not isinstance(s, str) or encoding not in ("latin1", "latin-1"):
        _refuse(f"_codecs.encode with encoding {encoding!r}")
    return s.encode("latin1")


_NP_RECONSTRUCT, _NP_FROMBUFFER = np.ndarray.__reduce__(np.zeros(0))[0], np.zeros(1).__reduce_ex__(5)[0]
# Every global a CIFAR pickle needs: the official files (Python 2, protocol 2) name numpy's array
# reconstruction, ndarray and dtype; Python 3 pickles of the same dicts add _codecs.encode and bytes()
# (protocol 2) or numpy._core's names and _frombuffer (protocol 5). Arrays are always plain ndarrays.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _np_dtype, ("_codecs", "encode"): _latin1,
    **{(m, "bytes"): lambda *a: _refuse("bytes() with arguments") if a else b"" for m in ("builtins", "__builtin__")},
    **{(f"numpy.{c}.multiarray", "_reconstruct"): lambda _, *a: _NP_RECONSTRUCT(np.ndarray, *a)
       for c in ("core", "_core")},
    **{(f"numpy.{c}.numeric", "_frombuffer"): lambda buf, dtype, *a: _NP_FROMBUFFER(buf, _np_dtype(dtype), *a)
       for c in ("core", "_core")},
}


class _CifarUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, strings, numbers and plain numpy arrays: any other global
    (os.system, eval, a class) is refused before it is looked up, so a crafted file runs nothing."""

    def find_class(self, module, name):
        return _CIFAR_GLOBALS.get((module, name)) or _refuse(f"{module}.{name}")


def _read_cifar(folder, names, label_key, root):
    out = []
    for files in names:  # (train files, test files)
        xs, ys = [], []
        for path in (os.path.join(root, folder, name) for name in files):
            try:
                with open(path, "rb") as f:
                    d = _CifarUnpickler(f, encoding="latin1").load()
                xs.append(torch.from_numpy(np.asarray(d["data"], dtype=np.uint8)).view(-1, 3, 32, 32))
                ys.append(torch.as_tensor(d[label_key], dtype=torch.int64).view(-1))
                if len(xs[-1]) != len(ys[-1]):
                    raise ValueError(f"{len(xs[-1])} images but {len(ys[-1])} labels")
            except _Unsafe as e:
                raise DataError(f"{path}: {one_line(e)}") from None
            except Exception as e:  # whatever a damaged pickle raises
                raise _corrupt(path, e) from None
        out += [torch.cat(xs), torch.cat(ys)]
    return out


def _scipy_io():
    try:
        import scipy.io
    except ImportError:
        raise DataError("svhn: reading its .mat files needs scipy (pip install scipy)") from None
    return scipy.io


def _read_svhn(root):
    loadmat, out = _scipy_io().loadmat, []
    for path in (os.path.join(root, f"{s}_32x32.mat") for s in ("train", "test")):
        try:
            m = loadmat(path)
            x = torch.from_numpy(np.ascontiguousarray(m["X"].transpose(3, 2, 0, 1)))  # HWCN -> NCHW
            y = torch.from_numpy(m["y"].astype(np.int64)).view(-1) % 10  # the file labels 0 as 10
            if x.dtype != torch.uint8 or len(x) != len(y):
                raise ValueError(f"images {tuple(x.shape)} {x.dtype}, labels {tuple(y.shape)}")
        except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
            raise _corrupt(path, e) from None
        out += [x, y]
    return out


def _synthetic(root=None):
    """Deterministic, learnable 10-class images, independent of the global RNG: each class a fixed
    random low-frequency colour texture (zero mean per channel), placed at a random circular
    translation with a random contrast, plus pixel noise. The translation hides the class from a
    linear model (near chance) while a small CNN learns it in two epochs (resnet20: ~75%)."""
    g = torch.Generator().manual_seed(20240611)
    p = torch.rand(10, 3, 4, 4, generator=g) * 2 - 1
    p = p - p.mean((2, 3), keepdim=True)
    p = p / p.abs().amax((1, 2, 3), keepdim=True)
    textures = F.interpolate(p, size=(32, 32), mode="bicubic", align_corners=False)  # 10 x 3 x 32 x 32
    out = []
    for n in (SYNTHETIC_TRAIN, SYNTHETIC_TEST):
        y = torch.randperm(n, generator=g) % 10
        shift = torch.randint(0, 32, (n, 2), generator=g)
        rows = (torch.arange(32) + shift[:, :1]) % 32  # N x 32
        cols = (torch.arange(32) + shift[:, 1:]) % 32
        x = textures[y][torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
                        rows[:, None, :, None], cols[:, None, None, :]]
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
        x = 128 + 80 * contrast * x + 25 * torch.randn(n, 3, 32, 32, generator=g)
        out += [x.round().clamp(0, 255).to(torch.uint8), y]
    return out


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Spec:
    classes: Optional[tuple]  # None: inferred (folder)
    channels: Optional[int]
    size: Optional[int]
    mean: Optional[tuple]  # true per-channel statistics of the training split; None: computed
    std: Optional[tuple]
    files: tuple = ()  # the files read, relative to data_dir, in torchvision's layout
    read: Optional[Callable] = None  # data_dir -> [train x, train y, test x, test y]
    torchvision: Optional[Callable] = None  # the dataset class that downloads
    splits: tuple = ()  # its constructor arguments for train and test


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
TRAIN_TEST = ({"train": True}, {"train": False})


def _mnist_like(cls, mean, std):
    files = tuple(f"{cls.__name__}/raw/{p}-{k}-ubyte" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))
    return Spec(tuple(cls.classes), 1, 28, mean, std, files, partial(_read_mnist, cls.__name__), cls, TRAIN_TEST)


DATASETS = {
    "mnist": _mnist_like(tvd.MNIST, (0.1307,), (0.3081,)),
    "fashion-mnist": _mnist_like(tvd.FashionMNIST, (0.2860,), (0.3530,)),
    "kmnist": _mnist_like(tvd.KMNIST, (0.1918,), (0.3483,)),
    "cifar10": Spec(CIFAR10_CLASSES, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    tuple(f"cifar-10-batches-py/{f}" for f in sum(CIFAR10_FILES, [])),
                    partial(_read_cifar, "cifar-10-batches-py", CIFAR10_FILES, "labels"), tvd.CIFAR10, TRAIN_TEST),
    "cifar100": Spec(CIFAR100_CLASSES, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                     ("cifar-100-python/train", "cifar-100-python/test"),
                     partial(_read_cifar, "cifar-100-python", (["train"], ["test"]), "fine_labels"),
                     tvd.CIFAR100, TRAIN_TEST),
    "svhn": Spec(tuple("0123456789"), 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                 ("train_32x32.mat", "test_32x32.mat"), _read_svhn, tvd.SVHN, ({"split": "train"}, {"split": "test"})),
    "folder": Spec(None, None, None, None, None),  # DIR/train/<class>/*, DIR/test/<class>/* (or val/)
    "synthetic": Spec(tuple(f"class{i}" for i in range(10)), 3, 32, None, None, read=_synthetic),
}


def _ensure_files(name, spec, root, download):
    missing = [os.path.join(root, f) for f in spec.files if _path(root, f) is None]
    if not missing:
        return
    first = os.path.dirname(missing[0])  # 'data/cifar-10-batches-py/data_batch_1, data_batch_2, ...'
    where = "expected " + ", ".join(missing[:1] + [os.path.basename(p) if os.path.dirname(p) == first else p
                                                   for p in missing[1:]]) + " (torchvision's layout)"
    if not download:
        raise DataError(f"{name} not found and download is off: {where}")
    if name == "svhn":  # scipy reads SVHN (here and in torchvision's download check)
        _scipy_io()
    try:
        os.makedirs(root, exist_ok=True)
        # torchvision fetches, md5-checks and unpacks into a temporary folder; only then do complete
        # files move into place, so a failed download leaves nothing half-written where a run reads
        with tempfile.TemporaryDirectory(prefix=".download-", dir=root, ignore_cleanup_errors=True) as tmp:
            for kwargs in spec.splits:
                spec.torchvision(tmp, download=True, **kwargs)
            for src in [p for p in Path(tmp).rglob("*") if p.is_file() and not p.name.endswith((".tar.gz", ".tgz"))]:
                dst = Path(root) / src.relative_to(tmp)
                if not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with replacing(dst) as part:
                        shutil.move(src, part)
    except Exception as e:  # URLError, RuntimeError (torchvision), OSError, tarfile errors, ...
        raise DataError(f"{name}: download failed ({type(e).__name__}: {one_line(e, 160)}); {where}") from None
    if any(_path(root, f) is None for f in spec.files):
        raise DataError(f"{name}: download finished but {where}")


# ----------------------------------------------------------------------------- folders

class _FileReader:
    """path -> uint8 C x H x W: decoded as predict.read_image decodes it (first frame; grayscale
    files 1 channel, 16-bit ones their high byte; others RGB, alpha dropped), resized to `size` by
    torch's antialiased uint8 resize (predict.py reimplements it), converted to `channels`. Pillow
    raises clean errors on damaged files and refuses decompression bombs (Image.MAX_IMAGE_PIXELS)."""

    def __init__(self, size, channels):
        self.size, self.channels = tuple(size), channels

    def __call__(self, path):
        try:
            with Image.open(path) as im:
                im.seek(0)
                if im.mode not in GRAY_MODES:
                    a = np.asarray(im.convert("RGB"))
                elif im.mode.startswith("I"):
                    a = np.clip(np.asarray(im).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
                else:
                    a = np.asarray(im.convert("L"))
        except PIL_ERRORS as e:
            raise DataError(f"cannot decode image {path}: {one_line(e)}") from None
        img = torch.from_numpy(np.atleast_3d(a).transpose(2, 0, 1).copy())
        if tuple(img.shape[-2:]) != self.size:
            img = TF.resize(img, list(self.size), antialias=True)
        return _convert_channels(img, self.channels)


def _decode_all(files, reader):
    """uint8 N x C x H x W, decoded by a thread pool (Pillow releases the GIL while decoding)."""
    first = reader(files[0])
    out = torch.empty(len(files), *first.shape, dtype=torch.uint8)
    out[0] = first

    def work(i):
        out[i] = reader(files[i])
    with ThreadPoolExecutor(max(2, cpu_count())) as pool:
        list(pool.map(work, range(1, len(files)), chunksize=64))
    return out


def _list_images(split_dir, classes, ignore=()):
    unknown = [d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith(".")
               and d.name not in classes and d.name not in ignore]
    if unknown:
        raise DataError(f"{split_dir} has class folders not in train/: {', '.join(sorted(unknown)[:5])}")
    files, labels = [], []
    for label, c in enumerate(classes):
        d = os.path.join(split_dir, c)
        names = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS)) if os.path.isdir(d) else []
        files += [os.path.join(d, f) for f in names]
        labels += [label] * len(names)
    return files, torch.tensor(labels, dtype=torch.int64)


def _probe(files, k=1000):
    """Native channels (1 if every probed image is grayscale) and most common (H, W) from the
    headers of up to k files spread over the list (Pillow reads headers without decoding)."""
    sizes, gray = Counter(), True
    for i in sorted(set(np.linspace(0, len(files) - 1, min(k, len(files))).astype(int).tolist())):
        try:
            with Image.open(files[i]) as im:
                sizes[(im.height, im.width)] += 1
                gray &= im.mode in GRAY_MODES
        except PIL_ERRORS as e:
            raise DataError(f"cannot read image {files[i]}: {one_line(e)}") from None
    return gray, sizes.most_common(1)[0][0]


def _digest(x):
    """sha256 of a uint8 tensor's bytes (about 0.2 s for the 150 MB of CIFAR-10's train split)."""
    return hashlib.sha256(x.contiguous().numpy()).hexdigest()


def _cached_decode(cache_dir, prefix, key, files, reader, shape):
    """The split's images from cache_dir/<prefix><key>.pt, or decoded now and cached there (older
    caches of the prefix, from an older file list, are removed). The cache holds the sha256 of its
    images: a file damaged inside an intact zip, or one of another C x H x W, is decoded again."""
    path = os.path.join(cache_dir, f"{prefix}{key}.pt")
    if os.path.exists(path):
        try:
            d = torch.load(path, weights_only=True)
            x = d["images"]
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and tuple(x.shape) == (len(files), *shape)):
                got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
                problem = f"it holds {got} {getattr(x, 'dtype', '')}, not uint8 {(len(files), *shape)}"
            elif d.get("sha256") != _digest(x):
                problem = "its images do not match their checksum (damaged file)"
            else:
                return x
        except Exception as e:  # corrupt or foreign: decode again
            problem = f"unreadable ({one_line(e, 120)})"
        print(f"note: cache {path} is not usable: {problem}; decoding again", file=sys.stderr)
    print(f"decoding {len(files)} images (once; cached in {path})", flush=True)
    x = _decode_all(files, reader)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with replacing(path) as tmp:
            torch.save({"images": x, "sha256": _digest(x)}, tmp)
        for old in os.listdir(cache_dir):
            if old.startswith(prefix) and old.endswith(".pt") and old != os.path.basename(path):
                os.remove(os.path.join(cache_dir, old))
    except (OSError, RuntimeError) as e:  # read-only or full disk: work without the cache
        print(f"note: cannot write cache {path}: {one_line(e)}", file=sys.stderr)
    return x


def _load_folder(root, image_size, channels, in_memory):
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, d) for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise DataError(f"folder: expected {train_dir}/<class>/*.jpg|png and {root}/test/<class>/* (or val/)")
    classes = sorted(d.name for d in os.scandir(train_dir) if d.is_dir() and not d.name.startswith("."))
    splits = [_list_images(train_dir, classes), _list_images(test_dir, classes)]
    for (files, _), d in zip(splits, (train_dir, test_dir)):
        if not files:
            raise DataError(f"folder: no {'/'.join(IMAGE_EXTENSIONS)} images under {d}/<class>/")
    # A class folder without training images would become an output the model never learns:
    # dropped with a warning, unless the test split has images of it (then nothing can be right).
    counts = [torch.bincount(y, minlength=len(classes)).tolist() for _, y in splits]
    empty = [c for c, n in zip(classes, counts[0]) if n == 0]
    tested = [f"{c} ({t})" for c, n, t in zip(classes, *counts) if n == 0 and t]
    if tested:
        raise DataError(f"folder: class folder(s) {', '.join(tested)} of {test_dir} have test images but "
                        f"no training images in {train_dir}: add training images or remove the class")
    if empty:
        print(f"warning: folder: dropping class folder(s) without images in {train_dir}: {', '.join(empty)}",
              file=sys.stderr)
        classes = [c for c in classes if c not in empty]
        splits = [_list_images(d, classes, ignore=empty) for d in (train_dir, test_dir)]
    if len(classes) < 2:
        raise DataError(f"folder: {len(classes)} class folder(s) with images in {train_dir} "
                        f"({', '.join(classes)}); a classifier needs at least 2")
    gray, (h, w) = _probe(splits[0][0])
    if not image_size and h != w:
        raise DataError(f"folder: images are {h}x{w} (not square); choose an image size")
    size, native = image_size or h, 1 if gray else 3
    c, n = channels or native, len(splits[0][0]) + len(splits[1][0])
    if in_memory is None:
        in_memory = n * c * size * size <= IN_MEMORY_LIMIT
    ensure_fits((n if in_memory else 1) * max(c, native) * size * size, "cpu",
                f"{n if in_memory else 1} images at {size}x{size} px", "choose a smaller --image-size")
    if not in_memory:
        return classes, c, size, [Split(None, y, files, _FileReader((size, size), c)) for files, y in splits]
    out = []
    for (files, y), d in zip(splits, (train_dir, test_dir)):
        key = hashlib.sha256(f"v{CACHE_VERSION}\n".encode())
        for f in files:  # the cache is keyed by the file list, sizes and modification times
            st = os.stat(f)
            key.update(f"{f[len(root):]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        prefix = f"{os.path.basename(d)}-{size}x{size}-{'gray' if gray else 'rgb'}-"
        x = _cached_decode(os.path.join(root, ".cache"), prefix, key.hexdigest()[:16], files,
                           _FileReader((size, size), native), (native, size, size))
        out.append(Split(_convert_channels(x, c), y))
    return classes, c, size, out


# ----------------------------------------------------------------------------- preprocessing

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
    out = []
    for chunk in x.split(4096) if x.ndim == 4 else [x]:
        w = chunk.to(torch.int32)
        lum = (w.select(-3, 0) * 19595 + w.select(-3, 1) * 38470 + w.select(-3, 2) * 7471 + 0x8000) >> 16
        out.append(lum.to(torch.uint8).unsqueeze(-3))
    return torch.cat(out) if x.ndim == 4 else out[0]


def _stats(x):
    """Exact per-channel mean and std (0..1 scale) of uint8 N x C x H x W, from value histograms."""
    v, mean, std = torch.arange(256, dtype=torch.float64) / 255, [], []
    for c in range(x.shape[1]):
        h = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        h /= h.sum()
        m = (h * v).sum()
        mean.append(m.item())
        std.append(((h * v.square()).sum() - m.square()).clamp_min(0).sqrt().item())
    return tuple(mean), tuple(std)


def _stratified(labels, k, seed):
    """Sorted indices of k samples, each class in proportion to its size, chosen by seed."""
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    lab = labels[perm]
    counts = torch.bincount(lab)
    order = torch.argsort(lab, stable=True)  # grouped by class, shuffled inside each class
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[lab[order]]
    position = (rank.double() + 0.5) / counts[lab].double()  # evenly spread over [0, 1) per class
    return perm[torch.argsort(position, stable=True)[:k]].sort().values


def _subset(split, idx):
    return Split(split.images[idx] if split.images is not None else None, split.labels[idx],
                 [split.files[i] for i in idx.tolist()] if split.files is not None else None, split.reader)


def load_data(name, data_dir="data", *, image_size=None, channels=None, val_split=0.0,
              limit_train=None, limit_test=None, seed=0, download=True, in_memory=None):
    """Load a registered dataset as uint8 splits; see the module docstring.

    in_memory (folder only): None = decide by size (IN_MEMORY_LIMIT), False = file-backed split
    for the dataloader path, True = decode everything (once, cached under DIR/.cache/)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    root, spec = str(data_dir or "data"), DATASETS[name]
    if name == "folder":
        classes, c, size, (train, test) = _load_folder(root, image_size, channels, in_memory)
    else:
        _ensure_files(name, spec, root, download)
        xtr, ytr, xte, yte = spec.read(root)
        classes, c, size = list(spec.classes), channels or spec.channels, image_size or spec.size
        ensure_fits((len(xtr) + len(xte)) * max(c, xtr.shape[1]) * size * size, "cpu",
                    f"{len(xtr) + len(xte)} {name} images at {size}x{size} px", "choose a smaller --image-size")
        if xtr.shape[-1] != size or xtr.shape[-2] != size:  # antialiased bilinear, in chunks
            xtr, xte = (torch.cat([TF.resize(b, [size, size], antialias=True) for b in x.split(2048)])
                        for x in (xtr, xte))
        train, test = Split(_convert_channels(xtr, c), ytr), Split(_convert_channels(xte, c), yte)
    val = None
    if val_split:
        k = round(len(train) * val_split)
        if not 0 < k < len(train):
            raise DataError(f"val_split {val_split} of {len(train)} training images leaves an empty split")
        is_val = torch.zeros(len(train), dtype=torch.bool)
        is_val[_stratified(train.labels, k, _seed(seed, "val"))] = True
        val, train = _subset(train, is_val.nonzero()[:, 0]), _subset(train, (~is_val).nonzero()[:, 0])
    if spec.mean is not None and c == spec.channels:
        mean, std = spec.mean, spec.std
    elif spec.mean is not None and spec.channels == 1:  # gray repeated: the same statistics
        mean, std = spec.mean * c, spec.std * c
    elif train.images is not None:  # folder, synthetic, RGB -> gray: the training split's own
        mean, std = _stats(train.images)
    else:  # file-backed folder: estimated on up to 2000 training images spread over the split
        idx = sorted(set(np.linspace(0, len(train) - 1, min(2000, len(train))).astype(int).tolist()))
        mean, std = _stats(_decode_all([train.files[i] for i in idx], train.reader))
    if limit_train and limit_train < len(train):
        train = _subset(train, _stratified(train.labels, limit_train, _seed(seed, "limit_train")))
    if limit_test and limit_test < len(test):
        test = _subset(test, _stratified(test.labels, limit_test, _seed(seed, "limit_test")))
    return Data(name, classes, c, size, tuple(mean), tuple(std), train, val, test)


def _names(names, limit=12):
    return f"[{', '.join(map(str, names[:limit]))}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def match_classes(d, classes, source):
    """`d` with its labels in the order of `classes` (a model's class list, from `source`, e.g. a
    checkpoint path), and a note when they had to be reordered (None otherwise). The same names in
    another order (a folder listed differently) are mapped by name; other names are a DataError
    naming both lists: the model's outputs would be scored against the wrong classes."""
    classes, have = [str(c) for c in classes], [str(c) for c in d.classes]
    if have == classes:
        return d, None
    if sorted(have) != sorted(classes) or len(set(classes)) != len(classes):
        diff = "; ".join(f"only in {w}: {_names(v, 5)}" for w, v in (("the data", [c for c in have if c not in classes]),
                                                                     (source, [c for c in classes if c not in have])) if v)
        raise DataError(f"class mismatch: {d.name} data has {len(have)} classes {_names(have)} but "
                        f"{source} was trained on {len(classes)} {_names(classes)}" + (f" ({diff})" if diff else ""))
    order = torch.tensor([classes.index(c) for c in have])  # data label -> model label
    relabel = lambda s: None if s is None else Split(s.images, order[s.labels], s.files, s.reader)  # noqa: E731
    return (Data(d.name, classes, d.in_channels, d.image_size, d.mean, d.std, *map(relabel, (d.train, d.val, d.test))),
            f"{d.name} data lists the classes of {source} in another order; labels mapped by class name to its order")


def checkpoint_data(ck, source, *, dataset=None, data_dir=None, download=False, **overrides):
    """The data a checkpoint was trained and tested on, rebuilt from its recorded arguments
    (dataset, data dir, val split, limits, seed; its image size and channels), labelled in the
    order of its classes (match_classes; a note when reordered). `dataset` / `data_dir` override
    the recorded ones, `overrides` any other load_data argument (e.g. limit_train=512)."""
    a = ck["args"]
    name = dataset or a.get("dataset")
    if not name:
        raise DataError(f"{source} does not record its dataset; pass --dataset")
    kw = dict(image_size=ck["image_size"], channels=ck["in_channels"], val_split=a.get("val_split") or 0.0,
              limit_train=a.get("limit_train"), limit_test=a.get("limit_test"), seed=a.get("seed") or 0,
              download=download)
    d = load_data(name, data_dir or a.get("data_dir") or "data", **{**kw, **overrides})
    if ck["classes"] is None:
        if d.num_classes != ck["num_classes"]:
            raise DataError(f"dataset {name} has {d.num_classes} classes but {source} was trained for "
                            f"{ck['num_classes']}")
        return d
    d, note = match_classes(d, ck["classes"], source)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return d


# ----------------------------------------------------------------------------- augmentation

def crop_padding(size):
    """The zero padding of the standard random crop."""
    return max(4, round(size / 8))  # 4 px at 32 px (the CIFAR recipe), scaled with the image


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


def _gray(x):
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x


def _strong(x, u):
    """The 'strong' preset, batched with per-sample parameters: random-resized-crop (area 35-100%,
    aspect 3/4-4/3), rotation up to 15 degrees and horizontal flip as one affine warp per image;
    then brightness, contrast, saturation jitter (factors 0.6-1.4) and sharpness 2 with p 0.5.
    x: uint8 B x C x H x W; u: B x 10 uniforms -> float B x C x H x W in [0, 255]."""
    B, C, H, W = x.shape
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
    m = _gray(x).mean((1, 2, 3), keepdim=True)
    x = ((x - m) * f[:, 1:2] + m).clamp_(0, 255)
    if C == 3:
        g = _gray(x)
        x = ((x - g) * f[:, 2:3] + g).clamp_(0, 255)
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    blur = x.clone()  # torchvision's sharpness: the smoothed image, borders kept
    blur[:, :, 1:-1, 1:-1] = F.conv2d(x.reshape(B * C, 1, H, W), kernel[None, None]).view(B, C, H - 2, W - 2)
    return torch.where(u[:, 9, None, None, None] < 0.5, (blur + 2 * (x - blur)).clamp_(0, 255), x)


def _policy(augment):
    return {"autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
            "randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}[augment]()


# ----------------------------------------------------------------------------- loaders

class Loader:
    """Iterable of (x, y) batches on the device over `split`. In-memory splits take the tensor path,
    file-backed ones the dataloader path (workers decode the files); both then gather, augment and
    normalize each batch the same way on the device. train=True: shuffled, augmented, sharded by
    rank, full batches only (a partial one when the shard is smaller than a batch). train=False:
    sequential, everything. image_size: resize the batches to it (default: the split's size)."""

    def __init__(self, split, *, mean, std, batch_size, train, augment="none", cutout=0, device="cpu",
                 seed=0, channels_last=False, rank=0, world_size=1, workers=4, image_size=None):
        self.device, self.train, self.batch_size = torch.device(device), train, batch_size
        self.seed, self.rank, self.total, self.channels_last, self.epoch = seed, rank, len(split), channels_last, 0
        self.augment, self.cutout = (augment or "none", cutout) if train else ("none", 0)
        self.world_size = world_size if train else 1
        per_rank = self.total // self.world_size
        if per_rank == 0:
            raise DataError(f"a split of {self.total} images cannot feed {world_size} processes")
        self.num_samples = per_rank if not train or per_rank < batch_size else per_rank // batch_size * batch_size
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
                               for v in (mean, std))
        self.policy = _policy(self.augment) if self.augment in AUGMENTS[3:] else None
        self.on_device = split.images is not None
        if self.on_device:  # tensor path: the whole split moves to the device once
            self.images, self.labels = split.images.to(self.device), split.labels.to(self.device)
            self.size = self.images.shape[-1]
        else:  # dataloader path: the sampler is the epoch's order, set in __iter__
            self.size, self._order = split.reader.size[-1], []
            self._dl = torch.utils.data.DataLoader(split, batch_size=batch_size, sampler=self._order,
                                                   num_workers=workers, pin_memory=self.device.type == "cuda",
                                                   persistent_workers=workers > 0)
        self.image_size = image_size or self.size

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch):
        """Make the next pass epoch `epoch` (without calls, passes count up from 0)."""
        self.epoch = epoch

    def _draw(self, epoch):
        """This epoch's sample order and augmentation parameters, drawn on the CPU."""
        if not self.train:
            return torch.arange(self.num_samples), {}
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, "order"))  # the same for all ranks
        perm = torch.randperm(self.total, generator=g)
        # Interleaved shards: rank r takes every world_size-th sample, so the ranks' batches
        # b together are exactly global batch b of a single-process run with the same seed.
        order = perm[self.rank::self.world_size][:self.num_samples]
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, "augment", self.rank))
        n, p = self.num_samples, {}
        if self.augment in ("standard",) + AUGMENTS[3:]:
            pad = crop_padding(self.size)
            p["dy"] = torch.randint(0, 2 * pad + 1, (n,), generator=g)
            p["dx"] = torch.randint(0, 2 * pad + 1, (n,), generator=g)
            p["flip"] = torch.rand(n, generator=g) < 0.5
            if self.augment != "standard":
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
        if self.on_device:
            order = order.to(self.device)
            batches = ((self.images.index_select(0, i), self.labels.index_select(0, i))
                       for i in order.split(self.batch_size))
        else:
            self._order[:] = order.tolist()
            batches = self._dl
        try:
            for b, (x, y) in enumerate(batches):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                s = slice(b * self.batch_size, b * self.batch_size + len(x))
                if "dy" in dev:
                    x = _crop_flip(x, dev["dy"][s], dev["dx"][s], dev["flip"][s], crop_padding(self.size))
                if self.policy is not None:
                    # torchvision's policies draw one operation per call for the whole tensor, so they run
                    # per chunk of POLICY_CHUNK images (not per image), each chunk seeded from the plan
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


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    return p


def main(args):
    d = load_data(args.dataset, args.data_dir, download=not args.no_download)
    print(f"{d.name}: {d.num_classes} classes, {d.in_channels}x{d.image_size}x{d.image_size}, "
          f"{len(d.train)} train / {len(d.test)} test, mean {tuple(round(m, 4) for m in d.mean)} "
          f"std {tuple(round(s, 4) for s in d.std)}")


def cli(argv=None):
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
