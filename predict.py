"""Classify images with an exported ONNX model, on a machine without PyTorch.

    python predict.py runs/demo/best.onnx cat.jpg dog.png            # top-5 per image
    python predict.py runs/demo/best.int8.onnx photos/ --top-k 1     # every image under photos/
    python predict.py runs/demo/best.onnx photos/ --json > predictions.json
    python predict.py runs/demo/best.onnx photos/ --provider cuda    # onnxruntime-gpu

Needs only onnxruntime (or onnxruntime-gpu), numpy and Pillow: `pip install onnxruntime numpy
pillow`. Everything it needs to know comes from the model's metadata (written by export.py):
image size, channels, mean, std, class names.

Preprocessing gives the same uint8 pixels as data.py, so the top-1 equals evaluate.py's on the
same files: decode with Pillow (to RGB, or to gray for grayscale files), resize with antialiased
bilinear interpolation in torch's uint8 arithmetic (below, in numpy: Pillow's own resize differs
from it by 1 in about 1% of the pixels), convert channels (gray -> RGB by repetition, RGB -> gray
by Pillow's luminance), then (pixel / 255 - mean) / std in float32.

Output: one line per image and rank, `<image>\\t<rank>\\t<class index>\\t<class name>\\t<probability>`
(the format of cpp/classify), or with --json one JSON document. Exit 0, 1 on an error (one line on
stderr), 2 on bad usage, 130 on Ctrl-C.
"""
import argparse
import ctypes
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")  # what data.py reads from a folder
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # Pillow modes data.py decodes as gray
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "cpu": "CPUExecutionProvider"}


class PredictError(Exception):
    """A user-facing problem; the message is one line."""


# --------------------------------------------------------------------------- preprocessing
def read_image(path):
    """uint8 H x W x C (C = 1 for grayscale files, else 3), decoded as data.py decodes it: the first
    frame of an animation, alpha dropped, 16-bit samples shifted down to 8 bits."""
    try:
        with Image.open(path) as im:
            im.seek(0)
            if im.mode in GRAY_MODES:
                if im.mode.startswith("I"):  # 16-bit gray: the high byte, as torchvision decodes it
                    a = np.clip(np.asarray(im).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
                else:
                    a = np.asarray(im.convert("L"))
                return a[:, :, None]
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # Pillow raises these for unreadable files
        raise PredictError(f"cannot read image {path}: {' '.join(str(e).split()) or type(e).__name__}") from None


def _resize_weights(n_in, n_out):
    """(n_out x n_in integer weights, precision bits) of antialiased bilinear resampling as torch
    computes them for uint8 (aten's _compute_index_ranges_int16_weights: PIL's triangle filter,
    widened by the scale when shrinking, in double, normalized per output, then scaled to int16 with
    as many bits as the largest weight allows). Python floats are doubles: the same rounding."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    max_taps = int(math.ceil(support)) * 2 + 1
    rows, wt_max = [], 0.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int(): truncation toward zero, as the C++ cast
        count = min(max(min(int(center + support + 0.5), n_in) - lo, 0), max_taps)
        w = []
        for j in range(count):
            x = abs((j + lo - center + 0.5) * invscale)
            w.append(1.0 - x if x < 1.0 else 0.0)
        total = 0.0
        for v in w:
            total += v
        if total != 0.0:
            w = [v / total for v in w]
            wt_max = max([wt_max] + w)
        rows.append((lo, w))
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i, (lo, w) in enumerate(rows):
        for j, v in enumerate(w):
            v *= 1 << precision
            m[i, lo + j] = int(-0.5 + v) if v < 0 else int(0.5 + v)
    return m, precision


def _resize_axis(x, n_out, axis):
    m, precision = _resize_weights(x.shape[axis], n_out)
    x = np.moveaxis(x, axis, -1).astype(np.float64)
    s = (x @ m.T).astype(np.int64)  # integer products summing below 2**31: exact in float64
    out = np.clip((s + (1 << (precision - 1))) >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def resize(img, size):
    """uint8 H x W x C -> size x size x C: antialiased bilinear, bit-identical to torchvision's
    TF.resize(antialias=True) on a uint8 tensor (torch's uint8 kernels): rows first, then columns,
    each pass rounded to uint8 as torch's two passes are."""
    if img.shape[1] != size:
        img = _resize_axis(img, size, 1)
    if img.shape[0] != size:
        img = _resize_axis(img, size, 0)
    return img


def convert_channels(img, channels):
    """uint8 H x W x C -> H x W x channels as data._convert_channels: gray -> RGB by repetition,
    RGB -> gray by Pillow's fixed-point luminance (R 299/1000 + G 587/1000 + B 114/1000)."""
    c = img.shape[2]
    if c == channels:
        return img
    if c == 1 and channels == 3:
        return np.repeat(img, 3, axis=2)
    if c == 3 and channels == 1:
        w = img.astype(np.int32)
        lum = (w[..., 0] * 19595 + w[..., 1] * 38470 + w[..., 2] * 7471 + 0x8000) >> 16
        return lum.astype(np.uint8)[:, :, None]
    raise PredictError(f"cannot convert a {c}-channel image to {channels} channels")


def preprocess_uint8(path, size, channels):
    """uint8 C x H x W, the pixels data.py feeds the network for the same file."""
    img = read_image(path)
    if img.shape[0] != size or img.shape[1] != size:
        img = resize(img, size)
    return np.ascontiguousarray(convert_channels(img, channels).transpose(2, 0, 1))


def normalize(x, mean, std):
    """uint8 N x C x H x W -> float32, (x / 255 - mean) / std, in float32 as data.py's loader."""
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x.astype(np.float32) / np.float32(255) - mean) / std


# --------------------------------------------------------------------------- model
class Model:
    """An onnxruntime session with the preprocessing export.py wrote into the model's metadata."""

    def __init__(self, path, provider="auto"):
        if not Path(path).is_file():
            raise PredictError(f"no such model file: {path}")
        chain = providers_for(provider)
        if any(p != PROVIDERS["cpu"] for p in chain) and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA / cuDNN from the nvidia-* wheels of onnxruntime-gpu[cuda,cudnn]
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only
        try:
            self.sess = ort.InferenceSession(str(path), so, providers=chain)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise PredictError(f"cannot load {path}: {str(e).strip().splitlines()[0][:300]}") from None
        self.provider = self.sess.get_providers()[0]
        if provider != "auto" and self.provider != chain[0]:  # onnxruntime falls back silently
            raise PredictError(f"{chain[0]} cannot run here (missing CUDA/TensorRT libraries or GPU?); "
                               f"onnxruntime uses {self.sess.get_providers()}")
        meta = self.sess.get_modelmeta().custom_metadata_map
        try:
            self.classes = json.loads(meta["classes"])
            self.mean, self.std = json.loads(meta["mean"]), json.loads(meta["std"])
            self.image_size, self.in_channels = int(meta["image_size"]), int(meta["in_channels"])
        except (KeyError, ValueError, TypeError):
            raise PredictError(f"{path} lacks export.py's metadata (classes, mean, std, image_size, in_channels): "
                               "export it with `python export.py CKPT`") from None
        if not len(self.mean) == len(self.std) == self.in_channels:
            raise PredictError(f"{path}: metadata mean/std do not have {self.in_channels} values")
        self.precision = meta.get("precision", "fp32")
        inp = self.sess.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.sess.get_outputs()[0].name
        self.max_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None  # static-batch export: 1

    def logits(self, x):
        """float32 N x C x H x W (normalized) -> float32 N x num_classes, in chunks the model takes."""
        step = self.max_batch or len(x)
        return np.concatenate([self.sess.run([self.output_name], {self.input_name: x[i:i + step]})[0]
                               for i in range(0, len(x), step)])

    def predict(self, paths, top_k):
        """[(path, [(index, name, probability), ...]), ...] for a batch of image files."""
        x = np.stack([preprocess_uint8(p, self.image_size, self.in_channels) for p in paths])
        logits = self.logits(normalize(x, self.mean, self.std)).astype(np.float64)
        if logits.shape[1] != len(self.classes):
            raise PredictError(f"the model gives {logits.shape[1]} logits but its metadata names "
                               f"{len(self.classes)} classes")
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]  # ties: the lower index first, as argmax
        return [(p, [(int(c), self.classes[c], float(prob[i, c])) for c in order[i]]) for i, p in enumerate(paths)]


def loads(lib):
    """Whether a shared library loads (Linux names; elsewhere assumed present: onnxruntime decides)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        ctypes.CDLL(lib)
        return True
    except OSError:
        return False


# What a provider needs besides onnxruntime-gpu: the NVIDIA driver, and TensorRT 10 for TensorRT.
# Checked first, so that a machine without them gets one line instead of onnxruntime's log.
NEEDS = {"cuda": ("libcuda.so.1",), "tensorrt": ("libcuda.so.1", "libnvinfer.so.10"), "cpu": ()}


def providers_for(name):
    """The provider chain for onnxruntime: `name` and the ones after it (TensorRT, CUDA, CPU; each
    later one takes the nodes an earlier one lacks). auto: TensorRT when its library loads, else
    CUDA when there is an NVIDIA driver, else the CPU."""
    available = ort.get_available_providers()
    if name == "auto":
        name = next(p for p in PROVIDERS if PROVIDERS[p] in available and all(map(loads, NEEDS[p])))
    elif PROVIDERS[name] not in available:
        raise PredictError(f"onnxruntime {ort.__version__} has no {PROVIDERS[name]} (it has "
                           f"{', '.join(available)}); for CUDA/TensorRT: pip install onnxruntime-gpu")
    else:
        missing = [lib for lib in NEEDS[name] if not loads(lib)]
        if missing:
            raise PredictError(f"--provider {name}: {', '.join(missing)} does not load here (no NVIDIA driver"
                               f"{' or TensorRT 10' if name == 'tensorrt' else ''}?)")
    return [PROVIDERS[p] for p in list(PROVIDERS)[list(PROVIDERS).index(name):]]


# --------------------------------------------------------------------------- main
def image_files(inputs):
    """Files as given, and every image under a directory (sorted, recursively)."""
    files = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise PredictError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {p}")
            files += found
        elif p.is_file():
            files.append(str(p))
        else:
            raise PredictError(f"no such file or directory: {p}")
    return files


def positive_int(text):  # runtime.int_range would import torch
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.onnx", help="a model written by export.py (fp32, fp16 or int8)")
    p.add_argument("inputs", metavar="IMAGE|DIR", nargs="+", help="image files, or folders searched recursively")
    p.add_argument("--top-k", type=positive_int, default=5, help="classes per image (at most the class count)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of tab-separated lines")
    p.add_argument("--provider", default="auto", choices=("auto", *PROVIDERS),
                   help="onnxruntime provider (auto: TensorRT, else CUDA where there is a GPU, else CPU)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per onnxruntime call")
    return p


def main(args, out=None):
    out = out or sys.stdout
    files = image_files(args.inputs)
    model = Model(args.model, args.provider)
    k = min(args.top_k, len(model.classes))
    results = []
    for i in range(0, len(files), args.batch_size):
        for path, top in model.predict(files[i:i + args.batch_size], k):
            if args.json:
                results.append({"image": path, "top_k": [{"index": c, "class": name, "probability": prob}
                                                         for c, name, prob in top]})
            else:
                for rank, (c, name, prob) in enumerate(top, 1):
                    out.write(f"{path}\t{rank}\t{c}\t{name}\t{prob:.6f}\n")
    if args.json:
        json.dump({"model": str(args.model), "precision": model.precision, "provider": model.provider,
                   "image_size": model.image_size, "in_channels": model.in_channels, "predictions": results},
                  out, indent=1)
        out.write("\n")
    return results


def cli(argv=None):
    """The command line's exit status: 0; 1 with one `error:` line; 130 on Ctrl-C; 2 on bad usage."""
    args = get_args_parser().parse_args(argv)
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
