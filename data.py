"""Datasets (the DATASETS registry), load-time preprocessing, augmentation and fast loaders.

    python data.py --dataset cifar10                     # load (download if missing), print a summary
    python bench.py --loader-only --dataset folder --data-dir /tmp/cifar10-jpeg   # vs the classic pipeline

load_data() returns a Data of uint8 splits (N x C x H x W) in torchvision's on-disk layouts.
make_loader() then picks one of two paths:
  tensor path      the split sits on the training device as one uint8 tensor; each batch is
                   gathered, augmented with per-sample random parameters in batched tensor ops
                   and normalized there (no per-image Python, no host sync per batch).
  dataloader path  folders too big for memory: torchvision transforms v2 in worker processes.
All randomness of an epoch is a pure function of (seed, epoch, rank): set_epoch(e) replays it.

Why one file of ~1,080 lines (over the ~650 this repo aims for): eight datasets in four on-disk
formats (IDX, CIFAR pickles, SVHN .mat, image folders) with their damage checks and the decode
cache, then the two loader paths with the same augmentations on both (the tensor path's batched
versions are tested against torchvision.transforms.v2's statistics). Splitting readers from
loaders would put each augmentation and its tensor-path twin in different files.
"""
import argparse
import gzip
import hashlib
import io
import math
import numbers
import os
import pickle
import shutil
import sys
import tempfile
import warnings
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image

from runtime import cpu_count, ensure_fits, run_cli

AUGMENTS = ("none", "standard", "strong", "autoaugment", "randaugment", "trivialaugment")
IN_MEMORY_LIMIT = 4 << 30  # folders above this many uint8 bytes use the dataloader path
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2560, 512
POLICY_CHUNK = 16  # tensor path: one AutoAugment/RandAugment/TrivialAugment draw per 16 images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
CACHE_VERSION = 2  # 2: the cache holds the sha256 of its images


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


def _one_line(e, limit=300):
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= limit else s[:limit] + "..."


def _seed(*parts):
    """A 63-bit seed from any tuple of plain values (seed, epoch, stream, rank)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------- file readers
# torchvision's dataset classes define the layout and do the downloading (with md5 checks of
# what they fetch). Reading goes through the small parsers below instead of the classes:
# torchvision's CIFAR/SVHN check the md5 of every file on load, so they refuse anything but the
# official bytes, and its MNIST reads only the unpacked IDX files. The parsers read the same
# formats the same way (IDX, CIFAR's pickles, SVHN's .mat) and give per-file error messages.

def _path(root, rel):
    """rel or rel.gz (MNIST ships gzipped IDX files) under root, or None."""
    for p in (os.path.join(root, rel), os.path.join(root, rel) + ".gz"):
        if os.path.isfile(p):
            return p
    return None


def _corrupt(path, e):
    return DataError(f"cannot read {path}: {_one_line(e)} (delete it to download it again)")


def _read_idx(path):
    """An IDX file (raw or .gz) of unsigned bytes -> uint8 tensor of its shape."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            buf = f.read()
        if len(buf) < 4 or buf[:2] != b"\0\0" or buf[2] != 0x08:
            raise ValueError("not an IDX file of unsigned bytes")
        ndim = buf[3]
        shape = tuple(int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
        start = 4 + 4 * ndim
        if len(buf) != start + int(np.prod(shape)):
            raise ValueError(f"{len(buf) - start} data bytes for shape {shape}")
    except (OSError, EOFError, ValueError) as e:
        raise _corrupt(path, e) from None
    return torch.frombuffer(bytearray(buf[start:]), dtype=torch.uint8).view(shape)


def _read_mnist(folder, root):
    out = []
    for prefix in ("train", "t10k"):
        x = _read_idx(_path(root, f"{folder}/raw/{prefix}-images-idx3-ubyte"))  # N x 28 x 28
        y = _read_idx(_path(root, f"{folder}/raw/{prefix}-labels-idx1-ubyte")).long()
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{root}/{folder}/raw/{prefix}-*: images {tuple(x.shape)} do not match labels {tuple(y.shape)}")
        out += [x.unsqueeze(1), y]
    return out


class _UnsafePickle(pickle.UnpicklingError):
    """A pickle that names a global the CIFAR files never contain (it could run code)."""


def _reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:  # numpy's own pickles pass exactly ndarray
        raise _UnsafePickle("numpy _reconstruct of a type other than ndarray")
    return _NP_RECONSTRUCT(subtype, shape, dtype)


def _dtype(*args):
    d = np.dtype(*args)
    if d.hasobject:  # an object array would hold whatever the pickle builds
        raise _UnsafePickle(f"a numpy array of Python objects (dtype {d})")
    return d


def _latin1(s="", encoding="utf-8", errors="strict"):
    """_codecs.encode as Python 3 protocol-2 pickles use it for bytes: latin-1 only."""
    if not isinstance(s, str) or encoding not in ("latin1", "latin-1"):
        raise _UnsafePickle(f"_codecs.encode with encoding {encoding!r}")
    return s.encode("latin1")


def _empty_bytes(*args):
    if args:  # protocol 2 writes b'' as bytes(); bytes(n) would allocate n bytes
        raise _UnsafePickle("bytes() with arguments")
    return b""


def _frombuffer(buf, dtype, shape, order, axis_order=None):
    """numpy's protocol-5 array constructor (numpy._core.numeric._frombuffer), dtype checked."""
    a = np.frombuffer(buf, dtype=_dtype(dtype))
    if order == "K" and axis_order is not None:
        return a.reshape(shape, order="C").transpose(axis_order)
    return a.reshape(shape, order=order)


_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy.(_)core.multiarray._reconstruct
# Every global a CIFAR pickle needs: the official files (Python 2 cPickle, protocol 2) name numpy's
# array reconstruction, ndarray and dtype; the same dicts pickled by Python 3 / numpy 2 add
# _codecs.encode and bytes (protocol 2) or numpy._core's names, _frombuffer (protocol 5).
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}
_CIFAR_GLOBALS[("numpy._core.numeric", "_frombuffer")] = _CIFAR_GLOBALS[("numpy.core.numeric", "_frombuffer")]


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only dicts, lists, strings, numbers and plain numpy arrays:
    any other global (os.system, builtins.eval, a class's constructor, ...) is refused before it
    is looked up, so a crafted data_batch file cannot run code."""

    def find_class(self, module, name):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _UnsafePickle(f"refusing to unpickle {module}.{name}: CIFAR files hold only "
                                "dicts, lists, strings and numpy arrays (crafted file?)") from None


def _read_cifar(folder, names, label_key, root):
    out = []
    for files in names:  # (train files, test files)
        xs, ys = [], []
        for name in files:
            path = os.path.join(root, folder, name)
            try:  # the pickles as torchvision reads them (Python 2 pickles of numpy arrays)
                with open(path, "rb") as f:
                    d = _CifarUnpickler(f, encoding="latin1").load()
                if not isinstance(d, dict):
                    raise ValueError(f"a pickled {type(d).__name__}, not a dict")
                xs.append(torch.from_numpy(np.asarray(d["data"], dtype=np.uint8)).view(-1, 3, 32, 32))
                ys.append(torch.as_tensor(d[label_key], dtype=torch.int64).view(-1))
                if len(xs[-1]) != len(ys[-1]):
                    raise ValueError(f"{len(xs[-1])} images but {len(ys[-1])} labels")
            except _UnsafePickle as e:
                raise DataError(f"{path}: {_one_line(e)}") from None
            except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, AttributeError,
                    MemoryError, pickle.UnpicklingError) as e:
                raise _corrupt(path, e) from None
        out += [torch.cat(xs), torch.cat(ys)]
    return out


def _read_svhn(root):
    try:
        import scipy.io
    except ImportError:
        raise DataError("svhn: reading its .mat files needs scipy (pip install scipy)") from None
    out = []
    for name in ("train_32x32.mat", "test_32x32.mat"):
        path = os.path.join(root, name)
        try:
            m = scipy.io.loadmat(path)
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
    files = tuple(f"{cls.__name__}/raw/{p}-{k}-idx{d}-ubyte" for p in ("train", "t10k")
                  for k, d in (("images", 3), ("labels", 1)))
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


def _expected(root, files):
    """'data/cifar-10-batches-py/data_batch_1, data_batch_2, ...' for an error message."""
    paths = [os.path.join(root, f) for f in files]
    return ", ".join([paths[0]] + [os.path.basename(p) if os.path.dirname(p) == os.path.dirname(paths[0])
                                   else p for p in paths[1:]])


def _ensure_files(name, spec, root, download):
    missing = [f for f in spec.files if _path(root, f) is None]
    if not missing:
        return
    where = f"expected {_expected(root, missing)} (torchvision's layout)"
    if not download:
        raise DataError(f"{name} not found and download is off: {where}")
    if name == "svhn":  # scipy reads SVHN (here and in torchvision's download check)
        try:
            import scipy.io  # noqa: F401
        except ImportError:
            raise DataError("svhn: reading its .mat files needs scipy (pip install scipy)") from None
    try:
        os.makedirs(root, exist_ok=True)
        # Download into a temporary folder: the class fetches, md5-checks, unpacks and parses;
        # only then are complete files moved (os.replace, atomic) into place, so an interrupted
        # or failed download never leaves half-written files where a later run would read them.
        tmp = tempfile.mkdtemp(prefix=".download-", dir=root)
        try:
            for kwargs in spec.splits:
                spec.torchvision(tmp, download=True, **kwargs)
            for dirpath, _, names in os.walk(tmp):
                for n in names:
                    src = os.path.join(dirpath, n)
                    dst = os.path.join(root, os.path.relpath(src, tmp))
                    if not n.endswith((".tar.gz", ".tgz")) and not os.path.exists(dst):
                        os.makedirs(os.path.dirname(dst), exist_ok=True)
                        os.replace(src, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:  # URLError, RuntimeError (torchvision), OSError, tarfile errors, ...
        raise DataError(f"{name}: download failed ({type(e).__name__}: {_one_line(e, 160)}); {where}") from None
    if _path(root, missing[0]) is None:
        raise DataError(f"{name}: download finished but {where}")


# ----------------------------------------------------------------------------- folders

# A PNG whose pixel data is damaged (a flipped bit, a short zlib stream, a bad row filter) makes
# libpng raise an error inside torchvision 0.29's decode_png that kills the process (SIGSEGV,
# seen in 197 of 200 randomly damaged PNGs here; JPEG, GIF and WebP raise exceptions instead).
# So a PNG is checked first, in Python, for every error libpng can meet while reading the rows.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _max_pixels():
    """PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS), or None when turned off."""
    from PIL import Image
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def _check_png(buf):
    """Raise ValueError unless `buf` (a whole .png file) decodes without a libpng error: chunk
    CRCs, the header, the zlib stream (complete, checksum right) and the filter byte of each row."""
    if buf[:8] != b"\x89PNG\r\n\x1a\n":
        return  # not a PNG (a .png name on another format): torchvision reads it by its content
    pos, idat, header = 8, [], None
    while True:
        if pos + 12 > len(buf):
            raise ValueError("truncated PNG (no IEND chunk)")
        n, kind = int.from_bytes(buf[pos:pos + 4], "big"), buf[pos + 4:pos + 8]
        end = pos + 12 + n
        if end > len(buf):
            raise ValueError(f"truncated PNG ({kind.decode('latin1')} chunk cut short)")
        critical = kind[:1].isupper()
        if critical and zlib.crc32(buf[pos + 4:end - 4]) != int.from_bytes(buf[end - 4:end], "big"):
            raise ValueError(f"PNG {kind.decode('latin1')} chunk fails its CRC (damaged file)")
        if kind == b"IHDR":
            header = buf[pos + 8:end - 4]
        elif kind == b"IDAT":
            idat.append(buf[pos + 8:end - 4])
        elif kind == b"IEND":
            break
        elif critical and kind != b"PLTE":
            raise ValueError(f"PNG with an unknown critical chunk {kind!r}")
        pos = end
    if header is None or len(header) != 13 or not idat:
        raise ValueError("PNG without a valid IHDR or without IDAT")
    w, h = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, color, compression, filtering, interlace = header[8:13]
    if (color not in _PNG_DEPTHS or depth not in _PNG_DEPTHS[color] or compression or filtering
            or interlace > 1 or not 0 < w < 2 ** 31 or not 0 < h < 2 ** 31):
        raise ValueError(f"PNG header invalid ({w}x{h}, bit depth {depth}, colour type {color})")
    limit = _max_pixels()
    if limit is not None and w * h > limit:
        raise ValueError(f"image size ({w}x{h} = {w * h} pixels) exceeds the limit of {limit} pixels "
                         "(a decompression bomb?)")
    bits = depth * _PNG_CHANNELS[color]
    rows = []  # (row count, bytes per row incl. the filter byte) of each (sub)image
    for x0, y0, dx, dy in (_ADAM7 if interlace else ((0, 0, 1, 1),)):
        pw, ph = -(-(w - x0) // dx), -(-(h - y0) // dy)
        if pw > 0 and ph > 0:
            rows.append((ph, 1 + -(-pw * bits // 8)))
    expected = sum(r * b for r, b in rows)
    z = zlib.decompressobj()
    try:
        raw = z.decompress(b"".join(idat), expected)
        if len(raw) == expected and not z.eof:
            z.decompress(z.unconsumed_tail, 1 << 16)  # the stream's end and its Adler-32 checksum
    except zlib.error as e:
        raise ValueError(f"PNG pixel data damaged ({e})") from None
    if len(raw) < expected:
        raise ValueError(f"PNG pixel data too short ({len(raw)} of {expected} bytes)")
    if not z.eof:
        raise ValueError("PNG pixel data longer than the image")
    start = 0
    for r, b in rows:
        if r and max(raw[start:start + r * b:b]) > 4:  # the first byte of each row
            raise ValueError("PNG row with an invalid filter type (damaged file)")
        start += r * b


def _jpeg_size(buf):
    """(width, height) from a JPEG's frame header (SOFn marker), or None."""
    i = 2
    while i + 9 < len(buf) and buf[i] == 0xFF:
        m = buf[i + 1]
        if m == 0xFF or m == 0x01 or 0xD0 <= m <= 0xD8:  # fill byte, markers without a length
            i += 1 if m == 0xFF else 2
            continue
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(buf[i + 7:i + 9], "big"), int.from_bytes(buf[i + 5:i + 7], "big")
        i += 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    return None


def _check_size(buf):
    """ValueError for an image whose header claims more pixels than PIL's decompression-bomb
    limit; torchvision would try to allocate all of them. JPEG headers are read here (about a
    microsecond), other formats' by PIL (header only)."""
    from PIL import Image
    limit = _max_pixels()
    if limit is None:
        return
    if buf[:2] == b"\xff\xd8":
        size = _jpeg_size(buf)
        if size is not None and size[0] * size[1] > limit:
            raise ValueError(f"image size ({size[0]}x{size[1]} = {size[0] * size[1]} pixels) exceeds the "
                             f"limit of {limit} pixels (a decompression bomb?)")
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(io.BytesIO(buf)).close()
    except Image.DecompressionBombError as e:
        raise ValueError(_one_line(e)) from None
    except Exception:  # not PIL's to judge: torchvision decodes it or says what is wrong
        pass


class _FileReader:
    """path -> uint8 C x H x W: decoded (RGB or GRAY), resized to `size`, converted to `channels`.
    The same function serves the cache (decoded once) and the dataloader path's workers."""

    def __init__(self, gray, size, channels=None):
        self.gray, self.size, self.channels = gray, tuple(size), channels

    def __call__(self, path):
        try:
            with open(path, "rb") as f:
                buf = f.read()
            if path.lower().endswith(".png") or buf[:8] == b"\x89PNG\r\n\x1a\n":
                _check_png(buf)
            else:
                _check_size(buf)
            data = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
            img = decode_image(data, mode=ImageReadMode.GRAY if self.gray else ImageReadMode.RGB)
        except (RuntimeError, OSError, ValueError) as e:
            raise DataError(f"cannot decode image {path}: {_one_line(e)}") from None
        img = img[0] if img.ndim == 4 else img  # an animated GIF: its first frame
        img = TF.to_dtype(img, torch.uint8, scale=True)  # 16-bit PNGs decode to uint16
        if tuple(img.shape[-2:]) != self.size:
            img = TF.resize(img, list(self.size), antialias=True)
        return _convert_channels(img, self.channels)


def _decode_all(files, reader):
    """Decode many files with a thread pool (the decoders release the GIL) -> uint8 N x C x H x W."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates torchvision.io in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        first = reader(files[0])
        out = torch.empty(len(files), *first.shape, dtype=torch.uint8)
        out[0] = first

        def work(i):
            out[i] = reader(files[i])
        with ThreadPoolExecutor(max(2, cpu_count())) as pool:
            list(pool.map(work, range(1, len(files)), chunksize=64))
    return out


def _list_images(split_dir, classes, ignore=()):
    files, labels = [], []
    subdirs = sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))
    unknown = [d for d in subdirs if d not in classes and d not in ignore]
    if unknown:
        raise DataError(f"{split_dir} has class folders not in train/: {', '.join(unknown[:5])}")
    for label, c in enumerate(classes):
        d = os.path.join(split_dir, c)
        names = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS)) if os.path.isdir(d) else []
        files += [os.path.join(d, f) for f in names]
        labels += [label] * len(names)
    return files, torch.tensor(labels, dtype=torch.int64)


def _probe(files, k=1000):
    """Native channels (1 if every probed image is grayscale) and most common (H, W) from the
    headers of up to k files spread over the list (PIL reads headers without decoding)."""
    from PIL import Image
    sizes, gray = Counter(), True
    for i in sorted(set(np.linspace(0, len(files) - 1, min(k, len(files))).astype(int).tolist())):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(files[i]) as im:
                    sizes[(im.height, im.width)] += 1
                    gray &= im.mode in ("1", "L", "LA", "I", "I;16", "F")
        except (OSError, Image.DecompressionBombError) as e:  # the latter is no OSError
            raise DataError(f"cannot read image {files[i]}: {_one_line(e)}") from None
    return gray, sizes.most_common(1)[0][0]


def _digest(x):
    """sha256 of a uint8 tensor's bytes (about 0.2 s for the 150 MB of CIFAR-10's train split)."""
    return hashlib.sha256(x.contiguous().numpy()).hexdigest()


def _cached_decode(cache_dir, prefix, key, files, reader, shape):
    """The split's images from cache_dir/<prefix><key>.pt, or decoded now and cached there
    (written atomically; older caches of the same prefix, from an older file list, are removed).
    The cache holds the sha256 of its images: a file damaged inside an intact zip, or one of
    another shape (C x H x W), is decoded again, with a note."""
    path = os.path.join(cache_dir, f"{prefix}{key}.pt")
    problem = None
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
            problem = f"unreadable ({_one_line(e, 120)})"
        print(f"note: cache {path} is not usable: {problem}; decoding again", file=sys.stderr)
    print(f"decoding {len(files)} images (once; cached in {path})", flush=True)
    x = _decode_all(files, reader)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(cache_dir, exist_ok=True)
        torch.save({"images": x, "sha256": _digest(x)}, tmp)
        os.replace(tmp, path)
        for old in os.listdir(cache_dir):
            if old.startswith(prefix) and old.endswith(".pt") and old != os.path.basename(path):
                os.remove(os.path.join(cache_dir, old))
    except (OSError, RuntimeError) as e:  # read-only or full disk: work without the cache
        print(f"note: cannot write cache {path}: {_one_line(e)}", file=sys.stderr)
        with suppress(OSError):
            os.remove(tmp)
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
    train_counts = torch.bincount(splits[0][1], minlength=len(classes)).tolist()
    test_counts = torch.bincount(splits[1][1], minlength=len(classes)).tolist()
    empty = [c for c, n in zip(classes, train_counts) if n == 0]
    tested = [f"{c} ({test_counts[classes.index(c)]})" for c in empty if test_counts[classes.index(c)]]
    if tested:
        raise DataError(f"folder: class folder(s) {', '.join(tested)} of {test_dir} have test images but "
                        f"no training images in {train_dir}: add training images or remove the class")
    if empty:
        print(f"warning: folder: dropping class folder(s) without images in {train_dir}: "
              f"{', '.join(empty)}", file=sys.stderr)
        classes = [c for c in classes if c not in empty]
        splits = [_list_images(train_dir, classes, ignore=empty), _list_images(test_dir, classes, ignore=empty)]
    if len(classes) < 2:
        raise DataError(f"folder: {len(classes)} class folder(s) with images in {train_dir} "
                        f"({', '.join(classes)}); a classifier needs at least 2")
    gray, size = _probe(splits[0][0])
    if image_size:
        size = (image_size, image_size)
    elif size[0] != size[1]:
        raise DataError(f"folder: images are {size[0]}x{size[1]} (not square); choose an image size")
    native = 1 if gray else 3
    c = channels or native
    n = len(splits[0][0]) + len(splits[1][0])
    if in_memory is None:
        in_memory = n * c * size[0] * size[1] <= IN_MEMORY_LIMIT
    ensure_fits((n if in_memory else 1) * max(c, native) * size[0] * size[1], "cpu",
                f"{n if in_memory else 1} images at {size[0]}x{size[1]} px", "choose a smaller --image-size")
    if not in_memory:
        reader = _FileReader(gray, size, c)
        return classes, c, size[0], [Split(None, y, files, reader) for files, y in splits]
    out, reader = [], _FileReader(gray, size)
    for (files, y), d in zip(splits, (train_dir, test_dir)):
        h = hashlib.sha256(f"v{CACHE_VERSION}\n".encode())
        for f in files:  # the cache is keyed by the file list, sizes and modification times
            st = os.stat(f)
            h.update(f"{f[len(root):]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        prefix = f"{os.path.basename(d)}-{size[0]}x{size[1]}-{'gray' if gray else 'rgb'}-"
        x = _cached_decode(os.path.join(root, ".cache"), prefix, h.hexdigest()[:16], files, reader,
                           (1 if gray else 3, *size))
        out.append(Split(_convert_channels(x, c), y))
    return classes, c, size[0], out


# ----------------------------------------------------------------------------- preprocessing

def _convert_channels(x, channels):
    """uint8 ... x C x H x W: gray -> 3 by repetition, RGB -> 1 by PIL's luminance (L = R 299/1000
    + G 587/1000 + B 114/1000, in PIL's fixed point, so it equals PIL's convert('L'))."""
    c = x.shape[-3]
    if channels is None or channels == c:
        return x
    if c == 1 and channels == 3:
        return x.repeat_interleave(3, dim=-3)
    if c == 3 and channels == 1:
        out = []
        for chunk in x.split(4096) if x.ndim == 4 else [x]:
            w = chunk.to(torch.int32)
            lum = (w.select(-3, 0) * 19595 + w.select(-3, 1) * 38470 + w.select(-3, 2) * 7471 + 0x8000) >> 16
            out.append(lum.to(torch.uint8).unsqueeze(-3))
        return torch.cat(out) if x.ndim == 4 else out[0]
    raise DataError(f"cannot convert {c}-channel images to {channels} channels (1 or 3)")


def _resize(x, size):
    """uint8 N x C x H x W -> N x C x size x size, antialiased bilinear, in chunks."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.cat([TF.resize(chunk, [size, size], antialias=True) for chunk in x.split(2048)])


def _stats(x):
    """Exact per-channel mean and std (0..1 scale) of uint8 N x C x H x W, from value histograms."""
    v = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
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
    root = str(data_dir or "data")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3 (got {channels})")
    if image_size is not None and not (isinstance(image_size, int) and image_size > 0):
        raise DataError(f"image_size must be a positive integer (got {image_size!r})")
    if not 0.0 <= (val_split or 0.0) < 1.0:
        raise DataError(f"val_split must be in [0, 1) (got {val_split})")
    for what, v in (("limit_train", limit_train), ("limit_test", limit_test)):
        if v is not None and v <= 0:
            raise DataError(f"{what} must be positive (got {v})")
    spec = DATASETS[name]
    if name == "folder":
        classes, c, size, (train, test) = _load_folder(root, image_size, channels, in_memory)
    else:
        _ensure_files(name, spec, root, download)
        xtr, ytr, xte, yte = spec.read(root)
        classes, c, size = list(spec.classes), channels or spec.channels, image_size or spec.size
        ensure_fits((len(xtr) + len(xte)) * max(c, xtr.shape[1]) * size * size, "cpu",
                    f"{len(xtr) + len(xte)} {name} images at {size}x{size} px", "choose a smaller --image-size")
        train, test = (Split(_convert_channels(_resize(x, size), c), y) for x, y in ((xtr, ytr), (xte, yte)))
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
        idx = np.linspace(0, len(train) - 1, min(2000, len(train))).astype(int)
        mean, std = _stats(_decode_all([train.files[i] for i in sorted(set(idx.tolist()))], train.reader))
    if limit_train and limit_train < len(train):
        train = _subset(train, _stratified(train.labels, limit_train, _seed(seed, "limit_train")))
    if limit_test and limit_test < len(test):
        test = _subset(test, _stratified(test.labels, limit_test, _seed(seed, "limit_test")))
    return Data(name, classes, c, size, tuple(mean), tuple(std), train, val, test)


def _names(names, limit=12):
    shown = ", ".join(map(str, names[:limit]))
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def match_classes(d, classes, source):
    """`d` with its labels in the order of `classes` (a model's class list, from `source`, e.g. a
    checkpoint path), and a note when they had to be reordered (None otherwise). The same names in
    another order (a folder listed differently) are mapped by name; other names are a DataError
    naming both lists: the model's outputs would be scored against the wrong classes."""
    classes = [str(c) for c in classes]
    if list(map(str, d.classes)) == classes:
        return d, None
    if sorted(map(str, d.classes)) != sorted(classes) or len(set(classes)) != len(classes):
        only_data = [c for c in map(str, d.classes) if c not in classes]
        only_model = [c for c in classes if c not in map(str, d.classes)]
        diff = "; ".join(f"only in {w}: {_names(v, 5)}" for w, v in (("the data", only_data), (source, only_model)) if v)
        raise DataError(f"class mismatch: {d.name} data has {len(d.classes)} classes {_names(d.classes)} but "
                        f"{source} was trained on {len(classes)} {_names(classes)}" + (f" ({diff})" if diff else ""))
    order = torch.tensor([classes.index(str(c)) for c in d.classes])  # data label -> model label
    relabel = lambda s: None if s is None else Split(s.images, order[s.labels], s.files, s.reader)  # noqa: E731
    mapped = Data(d.name, list(classes), d.in_channels, d.image_size, d.mean, d.std,
                  relabel(d.train), relabel(d.val), relabel(d.test))
    return mapped, (f"{d.name} data lists the classes of {source} in another order; labels mapped by "
                    f"class name to its order")


# ----------------------------------------------------------------------------- augmentation

def crop_padding(size):
    """The zero padding of the standard random crop."""
    return max(4, round(size / 8))  # 4 px at 32 px (the CIFAR recipe), scaled with the image


def _crop_flip(x, dy, dx, flip, pad):
    """Per-sample random crop of the zero-padded batch and horizontal flip, as one gather.
    x: uint8 B x C x H x W; dy, dx: B offsets in [0, 2 pad]; flip: B bool."""
    B, C, H, W = x.shape
    Wp = W + 2 * pad
    xp = F.pad(x, (pad, pad, pad, pad)).view(B, C, -1)  # B x C x (H+2p)(W+2p)
    ar_h, ar_w = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    rows = dy[:, None] + ar_h  # B x H
    cols = dx[:, None] + torch.where(flip[:, None], W - 1 - ar_w, ar_w)  # B x W
    src = (rows[:, :, None] * Wp + cols[:, None, :]).view(B, 1, H * W)  # B x 1 x HW
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
    sharp = u[:, 9, None, None, None] < 0.5
    return torch.where(sharp, (blur + 2 * (x - blur)).clamp_(0, 255), x)


def _policy(augment):
    return {"autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
            "randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}[augment]()


def _v2_transform(augment, size):
    """The same presets as torchvision transforms v2 on one uint8 image (dataloader path)."""
    crop_flip = [v2.RandomCrop(size, padding=crop_padding(size)), v2.RandomHorizontalFlip()]
    if augment == "none":
        return None
    if augment == "strong":
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomRotation(15),
                           v2.ColorJitter(0.4, 0.4, 0.4), v2.RandomAdjustSharpness(2, p=0.5),
                           v2.RandomHorizontalFlip()])
    return v2.Compose(crop_flip + ([] if augment == "standard" else [_policy(augment)]))


# ----------------------------------------------------------------------------- loaders

class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, split, transform):
        self.files, self.labels, self.reader, self.transform = split.files, split.labels, split.reader, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        i, sample_seed = item
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            x = self.reader(self.files[i])
        if self.transform is not None:
            # transforms draw from the global RNG: seed it per sample, so an epoch depends on
            # (seed, epoch, rank) only, not on the number of workers or on earlier epochs
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(sample_seed)
                x = self.transform(x)
        return x, self.labels[i]


class _PlanSampler(torch.utils.data.Sampler):
    """Yields (index, sample seed) of the epoch plan it was last given (set_plan)."""

    def __init__(self, num_samples):
        self.num_samples, self.plan = num_samples, None

    def set_plan(self, order, seeds):
        self.plan = (order, seeds)

    def __iter__(self):
        order, seeds = self.plan
        return iter(zip(order.tolist(), seeds.tolist()))

    def __len__(self):
        return self.num_samples


class Loader:
    """Iterable of (x, y) batches on the device; see make_loader."""

    def __init__(self, split, *, mean, std, batch_size, train, augment="none", cutout=0, device="cpu",
                 seed=0, channels_last=False, rank=0, world_size=1, workers=4, image_size=None):
        augment = augment or "none"
        if augment not in AUGMENTS:
            raise DataError(f"unknown augment {augment!r}; choose from {', '.join(AUGMENTS)}")
        if batch_size <= 0 or cutout < 0 or not 0 <= rank < world_size:
            raise DataError(f"bad loader settings: batch_size {batch_size}, cutout {cutout}, rank {rank}/{world_size}")
        n = len(split)
        self.device, self.train, self.batch_size, self.seed, self.rank = torch.device(device), train, batch_size, seed, rank
        self.augment, self.cutout = (augment, cutout) if train else ("none", 0)
        self.channels_last, self.epoch, self.world_size = channels_last, 0, world_size if train else 1
        per_rank = n // self.world_size
        if per_rank == 0:
            raise DataError(f"a split of {n} images cannot feed {world_size} processes")
        self.num_samples = per_rank if not train or per_rank < batch_size else per_rank // batch_size * batch_size
        self._len = -(-self.num_samples // batch_size)
        channels = split.images.shape[1] if split.images is not None else split.reader.channels
        for what, v in (("mean", mean), ("std", std)):  # from a checkpoint: check before use
            if (not isinstance(v, (list, tuple)) or len(v) != channels
                    or not all(isinstance(x, numbers.Real) and math.isfinite(x) for x in v)
                    or what == "std" and not all(x > 0 for x in v)):
                raise DataError(f"{what} must be {channels} finite numbers{' > 0' if what == 'std' else ''} "
                                f"for {channels}-channel images (got {_one_line(repr(v), 80)})")
        C = len(mean)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, C, 1, 1)
        self.on_device = split.images is not None
        if self.on_device:  # tensor path: the whole split moves to the device once
            self.images = split.images.to(self.device)
            self.labels = split.labels.to(self.device)
            self.size = self.images.shape[-1]
            if self.augment in AUGMENTS[3:]:
                self.policy = _policy(self.augment)
        else:  # dataloader path
            self.size = split.reader.size[-1]
            self._sampler = _PlanSampler(self.num_samples)
            self._dl = torch.utils.data.DataLoader(
                _FileDataset(split, _v2_transform(self.augment, self.size)), batch_size=batch_size,
                sampler=self._sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0)
        self.image_size = image_size or self.size

    def __len__(self):
        return self._len

    def set_epoch(self, epoch):
        """Make the next pass epoch `epoch` (without calls, passes count up from 0)."""
        self.epoch = epoch

    def _draw(self, epoch):
        """This epoch's sample order and augmentation parameters, drawn on the CPU."""
        if not self.train:
            return torch.arange(self.num_samples), {}
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, "order"))  # the same for all ranks
        total = len(self.labels) if self.on_device else len(self._dl.dataset)
        perm = torch.randperm(total, generator=g)
        # Interleaved shards: rank r takes every world_size-th sample, so the ranks' batches
        # b together are exactly global batch b of a single-process run with the same seed.
        order = perm[self.rank::self.world_size][:self.num_samples]
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, "augment", self.rank))
        n, p = self.num_samples, {}
        if not self.on_device:
            p["seed"] = torch.randint(2 ** 62, (n,), generator=g)
        elif self.augment in ("standard",) + AUGMENTS[3:]:
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
        batches = self._tensor_batches(order, p) if self.on_device else self._file_batches(order, p)
        for x, y, cut in batches:  # the batch is gathered and augmented here
            yield self._finish(x, y, cut)

    def _tensor_batches(self, order, p):
        order = order.to(self.device)
        dev = {k: v.to(self.device, non_blocking=True) for k, v in p.items() if k != "policy"}
        for i in range(self._len):
            s = slice(i * self.batch_size, min((i + 1) * self.batch_size, self.num_samples))
            if self.train:
                x, y = self.images.index_select(0, order[s]), self.labels.index_select(0, order[s])
            else:
                x, y = self.images[s], self.labels[s]
            if "dy" in dev:
                x = _crop_flip(x, dev["dy"][s], dev["dx"][s], dev["flip"][s], crop_padding(self.size))
            if "policy" in p:
                # torchvision's policies draw one operation per call for the whole tensor, so they
                # run per chunk of POLICY_CHUNK images (not per image), each chunk seeded from the plan
                with torch.random.fork_rng(devices=[]):
                    for j in range(0, len(x), POLICY_CHUNK):
                        torch.random.default_generator.manual_seed(int(p["policy"][s.start + j]))
                        x[j:j + POLICY_CHUNK] = self.policy(x[j:j + POLICY_CHUNK])
            if "u" in dev:
                x = _strong(x, dev["u"][s])
            yield x, y, dev["cut"][s] if "cut" in dev else None

    def _file_batches(self, order, p):
        self._sampler.set_plan(order, p.get("seed", torch.zeros(len(order), dtype=torch.int64)))
        cut, start = p["cut"].to(self.device) if "cut" in p else None, 0
        try:
            for x, y in self._dl:
                yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                       cut[start:start + len(x)] if cut is not None else None)
                start += len(x)
        except DataError as e:  # raised in a worker: keep the last line, the original message
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None

    def _finish(self, x, y, cut):
        """uint8 (or float 0..255) batch -> resized, normalized, cut out, in the memory format."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = TF.resize(x, [self.image_size, self.image_size], antialias=True)
        x = x.float().div_(255).sub_(self.mean).div_(self.std)
        if cut is not None:  # cutout: a square of side `cutout` around a random centre, zeroed
            H, W = x.shape[-2:]
            top = (cut[:, 0] * H).long() - self.cutout // 2
            left = (cut[:, 1] * W).long() - self.cutout // 2
            r = torch.arange(H, device=x.device) - top[:, None]  # B x H
            c = torch.arange(W, device=x.device) - left[:, None]  # B x W
            inside = ((r >= 0) & (r < self.cutout))[:, None, :, None] & ((c >= 0) & (c < self.cutout))[:, None, None, :]
            x = x.masked_fill_(inside, 0.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


def make_loader(split, *, mean, std, batch_size, train, augment="none", cutout=0, device="cpu",
                seed=0, channels_last=False, rank=0, world_size=1, workers=4, image_size=None):
    """A Loader over `split`: the tensor path for in-memory splits, the dataloader path for
    file-backed ones. train=True: shuffled, augmented, sharded by rank, full batches only (a
    partial one when the shard is smaller than a batch). train=False: sequential, everything."""
    return Loader(split, mean=mean, std=std, batch_size=batch_size, train=train, augment=augment,
                  cutout=cutout, device=device, seed=seed, channels_last=channels_last, rank=rank,
                  world_size=world_size, workers=workers, image_size=image_size)


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
