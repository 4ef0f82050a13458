"""Classify images with an exported ONNX model, on a machine without PyTorch.

    python predict.py runs/demo/best.onnx cat.jpg dog.png            # top-5 per image
    python predict.py runs/demo/best.int8.onnx photos/ --top-k 1     # every image under photos/
    python predict.py runs/demo/best.onnx photos/ --json > predictions.json
    python predict.py runs/demo/best.onnx photos/ --provider cuda    # onnxruntime-gpu

Needs only `pip install onnxruntime numpy pillow`; size, channels, mean, std and class names come
from the model's metadata. The network inputs are data.py's for the same file, bit for bit (torch's
uint8 resize redone in numpy: Pillow's differs by 1 in ~1% of the pixels), so the top-1 is
evaluate.py's. Output: `<image>\\t<rank>\\t<class index>\\t<class name>\\t<probability>` lines
(cpp/classify's format) or --json. Exit 0; 1 on an error (one line); 2 on bad usage; 130 on Ctrl-C.
"""
import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")  # what a folder's images may be
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # Pillow modes decoded as gray
PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # Pillow on a bad file
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "cpu": "CPUExecutionProvider"}
TENSORRT = "libnvinfer.so.10"  # TensorRT 10: what onnxruntime-gpu 1.31 links (pip's tensorrt 11.x is not it)
# What a provider needs besides onnxruntime-gpu, checked first: one line instead of onnxruntime's log.
NEEDS = {"cuda": ("libcuda.so.1",), "tensorrt": ("libcuda.so.1", TENSORRT), "cpu": ()}


class PredictError(ValueError):
    """A user-facing problem; the message is one line."""


def read_image(path):
    """uint8 H x W x C (C = 1 for grayscale files, else 3): the first frame of an animation, alpha
    dropped, 16-bit samples shifted down to 8 bits. data.py decodes folders with this very function."""
    try:
        with Image.open(path) as im:
            im.seek(0)
            if im.mode not in GRAY_MODES:
                return np.asarray(im.convert("RGB"))
            if im.mode.startswith("I"):  # 16-bit gray: the high byte, as torchvision decodes it
                return np.clip(np.asarray(im).astype(np.int64) >> 8, 0, 255).astype(np.uint8)[:, :, None]
            return np.asarray(im.convert("L"))[:, :, None]
    except PIL_ERRORS as e:  # damaged files, decompression bombs (Image.MAX_IMAGE_PIXELS)
        why = " ".join(str(e).split()) or type(e).__name__
        raise PredictError(f"cannot read image {path}: {why}") from None


def _resize_weights(n_in, n_out):
    """(n_out x n_in integer weights, precision bits) of torch's antialiased bilinear uint8 resize (aten's
    _compute_index_ranges_int16_weights: PIL's triangle filter widened when shrinking), in doubles."""
    scale = n_in / n_out
    support, invscale = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
    center = scale * (np.arange(n_out) + 0.5)
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)  # truncated toward zero, as the C++ cast
    hi = np.minimum((center + support + 0.5).astype(np.int64), n_in)
    j = np.arange(math.ceil(support) * 2 + 1)
    taps = j < np.clip(hi - lo, 0, None)[:, None]  # n_out x taps: the taps each output has
    w = np.maximum(0.0, 1.0 - np.abs((j + lo[:, None] - center[:, None] + 0.5) * invscale)) * taps
    total = np.cumsum(w, axis=1)[:, -1:]  # left to right as the C++ loop (np.sum is pairwise)
    w = np.divide(w, total, out=w, where=total != 0)
    # As many bits (at most 22) as keep the largest weight below 2**15.
    precision = next((p for p in range(22) if int(0.5 + w.max() * (1 << (p + 1))) >= 1 << 15), 22)
    m, (r, t) = np.zeros((n_out, n_in)), np.nonzero(taps)
    m[r, lo[r] + t] = np.trunc(w[r, t] * (1 << precision) + 0.5)  # the weights are >= 0: as torch rounds
    return m, precision


def resize(img, size):
    """uint8 H x W x C -> size x size x C, bit-identical to torchvision's TF.resize(antialias=True)
    on a uint8 tensor: rows first, then columns, each pass rounded to uint8 as torch's are."""
    for axis in (1, 0):
        if img.shape[axis] != size:
            m, precision = _resize_weights(img.shape[axis], size)
            s = (np.moveaxis(img, axis, -1).astype(np.float64) @ m.T).astype(np.int64)  # sums < 2**31: exact
            out = np.clip((s + (1 << (precision - 1))) >> precision, 0, 255).astype(np.uint8)
            img = np.moveaxis(out, -1, axis)
    return img


def convert_channels(img, channels):
    """uint8 H x W x C -> H x W x channels as data.py converts: gray -> RGB by repetition, RGB ->
    gray by Pillow's fixed-point luminance (R 299/1000 + G 587/1000 + B 114/1000, times 2**16)."""
    c = img.shape[2]
    if c == 1 and channels == 3:
        return np.repeat(img, 3, axis=2)
    if c == 3 and channels == 1:
        lum = (img.astype(np.int64) @ np.array([19595, 38470, 7471]) + 0x8000) >> 16
        return lum.astype(np.uint8)[..., None]
    if c != channels:
        raise PredictError(f"cannot convert a {c}-channel image to {channels} channels")
    return img


def preprocess_uint8(path, size, channels):
    """uint8 C x H x W, the pixels data.py feeds the network for the same file."""
    return np.ascontiguousarray(convert_channels(resize(read_image(path), size), channels).transpose(2, 0, 1))


def normalize(x, mean, std):
    """uint8 N x C x H x W -> float32, (x / 255 - mean) / std, in float32 as data.py's loader."""
    mean, std = (np.asarray(v, dtype=np.float32).reshape(1, -1, 1, 1) for v in (mean, std))
    return (x.astype(np.float32) / np.float32(255) - mean) / std


def loads(lib):
    """Whether a shared library loads (Linux names; elsewhere onnxruntime decides). TensorRT also from
    pip's tensorrt-cu13-libs, whose folder the loader does not search: importing it loads its libraries."""
    for attempt in range(2):
        try:
            return not sys.platform.startswith("linux") or bool(ctypes.CDLL(lib))
        except OSError:
            if attempt or lib != TENSORRT:
                return False
            with contextlib.suppress(ImportError, OSError):
                import tensorrt_libs  # noqa: F401


def providers_for(name):
    """`name` and the providers after it (each takes the nodes an earlier one lacks). auto: TensorRT
    when its libraries load, else CUDA where there is an NVIDIA driver (saying on stderr why not
    TensorRT, usually the faster), else the CPU."""
    available = ort.get_available_providers()
    if name == "auto":
        name = next(p for p in PROVIDERS if PROVIDERS[p] in available and all(map(loads, NEEDS[p])))
        if name == "cuda":
            why = f"{TENSORRT} (TensorRT 10) does not load" if PROVIDERS["tensorrt"] in available else \
                f"onnxruntime {ort.__version__} has no TensorRT provider"
            print(f"note: --provider auto: CUDA, not TensorRT: {why} (docs/deploy.md: install)",
                  file=sys.stderr)
    elif PROVIDERS[name] not in available:
        raise PredictError(f"onnxruntime {ort.__version__} has no {PROVIDERS[name]} (it has "
                           f"{', '.join(available)}); for CUDA/TensorRT: pip install onnxruntime-gpu")
    elif missing := [lib for lib in NEEDS[name] if not loads(lib)]:
        raise PredictError(f"--provider {name}: {', '.join(missing)} does not load here (no NVIDIA driver"
                           f"{' or TensorRT 10' if name == 'tensorrt' else ''}?)")
    return list(PROVIDERS.values())[list(PROVIDERS).index(name):]


def tensorrt_options(path, inp, batch_size):
    """An engine cache beside the model (else in the user's cache folder) and, for a dynamic batch, a
    profile of batches 1..batch_size: neither a new process nor a smaller last batch rebuilds the engine.
    Cache files are named after the model's bytes: onnxruntime's own key ignores the weights."""
    cache = Path(f"{path}.tensorrt") if os.access(Path(path).parent, os.W_OK) else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deeper-networks-tensorrt"
    cache.mkdir(parents=True, exist_ok=True)
    options = {"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache), "trt_engine_cache_prefix":
               "sha256_" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:20]}
    if not isinstance(inp.shape[0], int):
        shape = {n: f"{inp.name}:{n}x" + "x".join(map(str, inp.shape[1:])) for n in (1, batch_size)}
        options.update(trt_profile_min_shapes=shape[1], trt_profile_opt_shapes=shape[batch_size],
                       trt_profile_max_shapes=shape[batch_size])
    return options


class Model:
    """An onnxruntime session with the preprocessing export.py wrote into the model's metadata."""

    def __init__(self, path, provider="auto", batch_size=64):
        if not Path(path).is_file():
            raise PredictError(f"no such model file: {path}")
        chain = providers_for(provider)
        if chain[0] != PROVIDERS["cpu"] and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA / cuDNN from the nvidia-* wheels of onnxruntime-gpu[cuda,cudnn]
        ort.set_default_logger_severity(3)  # errors only
        trt = chain[0] == PROVIDERS["tensorrt"]
        try:  # TensorRT: a CPU session first, for the input's name and size (its profile)
            self.sess = ort.InferenceSession(str(path), providers=chain[-1:] if trt else chain)
            if trt:
                self.sess.set_providers([(chain[0], tensorrt_options(path, self.sess.get_inputs()[0],
                                                                     batch_size)), *chain[1:]])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise PredictError(f"cannot load {path}: {str(e).strip().splitlines()[0][:300]}") from None
        self.provider = self.sess.get_providers()[0]
        if provider != "auto" and self.provider != chain[0]:  # onnxruntime falls back silently
            raise PredictError(f"{chain[0]} cannot run here (missing CUDA/TensorRT libraries or GPU?); "
                               f"onnxruntime uses {self.sess.get_providers()}")
        meta, logits = self.sess.get_modelmeta().custom_metadata_map, self.sess.get_outputs()[0].shape[-1]
        try:
            self.classes, self.mean, self.std = (json.loads(meta[k]) for k in ("classes", "mean", "std"))
            self.image_size, self.in_channels = int(meta["image_size"]), int(meta["in_channels"])
            if not len(self.mean) == len(self.std) == self.in_channels or logits != len(self.classes):
                raise ValueError("malformed")
        except (KeyError, ValueError, TypeError):
            raise PredictError(f"{path} lacks export.py's metadata or it is malformed (classes: one per "
                               "logit; mean, std: one per channel; image_size, in_channels): export it with "
                               "`python export.py CKPT`") from None
        self.precision, inp = meta.get("precision", "fp32"), self.sess.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.sess.get_outputs()[0].name
        self.max_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None  # static-batch export: 1

    def predict(self, paths, top_k):
        """[{image, top_k: [{index, class, probability}, ...]}, ...] for at most max_batch image files."""
        x = normalize(np.stack([preprocess_uint8(p, self.image_size, self.in_channels) for p in paths]),
                      self.mean, self.std)
        logits = self.sess.run([self.output_name], {self.input_name: x})[0].astype(np.float64)
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]  # ties: lower index first, as argmax
        return [{"image": p, "top_k": [{"index": int(c), "class": self.classes[c],
                                        "probability": float(prob[i, c])} for c in order[i]]}
                for i, p in enumerate(paths)]


def image_files(inputs):
    """Files as given, and every image under a directory (sorted, recursively; hidden ones skipped)."""
    files = []
    for p in map(Path, inputs):
        if not p.exists():
            raise PredictError(f"no such file or directory: {p}")
        found = [str(p)] if not p.is_dir() else sorted(
            str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not found:
            raise PredictError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {p}")
        files += found
    return files


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.onnx", help="a model written by export.py (fp32, fp16 or int8)")
    p.add_argument("inputs", metavar="IMAGE|DIR", nargs="+", help="image files, or folders (recursively)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (at most all classes)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of tab-separated lines")
    p.add_argument("--provider", default="auto", choices=("auto", *PROVIDERS),
                   help="onnxruntime provider (auto: TensorRT, else CUDA where there is a GPU, else CPU)")
    p.add_argument("--batch-size", type=int, default=64, help="images per onnxruntime call")
    return p


def main(args):
    files, model = image_files(args.inputs), Model(args.model, args.provider, args.batch_size)
    k, step, results = min(args.top_k, len(model.classes)), model.max_batch or args.batch_size, []
    for i in range(0, len(files), step):
        results += (batch := model.predict(files[i:i + step], k))
        if not args.json:  # cpp/classify's lines
            sys.stdout.writelines(f"{r['image']}\t{n}\t{t['index']}\t{t['class']}\t{t['probability']:.6f}\n"
                                  for r in batch for n, t in enumerate(r["top_k"], 1))
    if args.json:
        print(json.dumps({"model": str(args.model), "precision": model.precision, "provider": model.provider,
                          "image_size": model.image_size, "in_channels": model.in_channels,
                          "predictions": results}, indent=1))
    return results


def cli(argv=None):  # its own runner, not runtime.run_cli: runtime imports torch, which this must not need
    p = get_args_parser()
    args = p.parse_args(argv)
    if min(args.top_k, args.batch_size) < 1:  # (runtime.number's range check would import torch)
        p.error("--top-k and --batch-size must be >= 1")
    try:
        main(args)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `| head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(cli())
