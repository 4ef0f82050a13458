"""Export a checkpoint to ONNX and/or an AOTInductor package; check it against PyTorch; time it.

    python export.py runs/demo/best.pt                          # -> runs/demo/best.onnx
    python export.py runs/demo/best.pt --check --benchmark      # parity + latency table (+ .benchmark.json)
    python export.py runs/demo/best.pt --format aoti            # -> best.pt2 + best.pt2.meta for cpp/classify
    python export.py best.pt --device cuda --benchmark --batch-sizes 1 256 --fp16   # on a GPU
    python export.py runs/demo/best.pt --int8 --check --benchmark  # + best.int8.onnx, calibrated on 512 train images

ONNX: torch.onnx.export(dynamo=True) (torch.export + onnxscript; the TorchScript exporter is
deprecated) of the eval-mode model (GoogLeNet's aux heads are not in the graph), input "input"
N x C x H x W float32, output "logits" N x num_classes, batch axis dynamic unless --static-batch
(then N = 1). One self-contained file unless the weights pass 2 GB (then <name>.onnx.data beside
it). model.metadata_props hold model_name, model_options, classes (JSON), mean, std, image_size,
in_channels, num_classes. --fp16: float16 weights and math inside, float32 input/output (the casts
are graph nodes), file <stem>.fp16.onnx. --int8: also <stem>.int8.onnx, static post-training
quantization by onnxruntime (QDQ, per-channel int8 weights, uint8 activations) calibrated on
--calibration N training images of the checkpoint's dataset (never test images); same metadata,
precision int8.

--check: onnxruntime (and the .pt2) vs PyTorch eager fp32 on random inputs and on real test
images of the checkpoint's dataset when they are on disk; fails (exit 1) when max |diff| / max
|logit| passes --tolerance. --benchmark: PyTorch eager, torch.compile (compile time apart) and
onnxruntime with an explicit provider (TensorRT > CUDA > CPU; CUDA: exhaustive cuDNN search,
I/O bound on the device, CUDA graphs), median/p90 latency and images/s as a table and JSON.
With --int8, --check also gives fp32 and int8 top-1 on the test split and their agreement, and
--benchmark times the int8 model beside the others.
"""
import argparse
import copy
import ctypes
import json
import numbers
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import onnxruntime as ort  # after torch: onnxruntime-gpu then finds the CUDA/cuDNN libraries torch loaded

from data import load_data, make_loader, match_classes
from checkpoint import load_checkpoint, model_from_checkpoint
from runtime import (device_name, ensure_fits, float_range, forward_bytes, int_range, out_of_memory_as_error,
                     pick_device, run_cli, time_calls)

AOTI_META_FORMAT = "deeper-networks-aoti/1"
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB cap, with room for the graph itself
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "cpu": "CPUExecutionProvider"}
MIN_OPSET = 18  # torch.export's ONNX exporter starts here; its down-conversion fails (e.g. for Pad)


def max_opset():
    """The highest opset the installed exporter writes: torch's ONNX_MAX_OPSET (a request above
    it is down-converted to 18 with a traceback, or written at a version onnxruntime cannot
    load), capped by the onnx package's own newest opset."""
    import onnx
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET as torch_max
    except ImportError:  # a torch that moved it: trust onnx's number
        torch_max = onnx.defs.onnx_opset_version()
    return min(torch_max, onnx.defs.onnx_opset_version())


class Float16(nn.Module):
    """float32 in and out, float16 inside: the casts become nodes of the exported graph."""

    def __init__(self, model):
        super().__init__()
        self.model = copy.deepcopy(model).half()
        self.eval()

    def forward(self, x):
        return self.model(x.half()).float()


# --------------------------------------------------------------------------- metadata
def model_info(ck):
    """What a deployment needs to know besides the weights, from the checkpoint alone."""
    n, c = ck["num_classes"], ck["in_channels"]
    classes = ck.get("classes") or list(range(n))
    mean, std = ck.get("mean"), ck.get("std")
    reals = lambda v, low: isinstance(v, (list, tuple)) and len(v) == c and all(  # noqa: E731
        isinstance(x, numbers.Real) and np.isfinite(x) and x > low for x in v)
    if (not isinstance(classes, (list, tuple)) or len(classes) != n or not reals(mean, -np.inf)
            or not reals(std, 0)):
        raise ValueError(f"checkpoint lacks usable classes/mean/std (num_classes={n}, in_channels={c})")
    classes = [str(x) for x in classes]
    return {"model_name": ck["model_name"], "model_options": dict(ck["model_options"]), "num_classes": n,
            "classes": classes, "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "image_size": ck["image_size"], "in_channels": ck["in_channels"],
            "dataset": _args(ck).get("dataset"), "epoch": ck.get("epoch")}


def _args(ck):
    """The checkpoint's recorded training arguments ({} when absent or not a dict)."""
    return ck["args"] if isinstance(ck.get("args"), dict) else {}


def onnx_metadata(info, fp16):
    """onnx metadata_props are str -> str: lists and dicts as JSON."""
    props = {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items() if v is not None}
    return {**props, "input_name": "input", "output_name": "logits", "precision": "fp16" if fp16 else "fp32",
            "layout": "NCHW, float32, normalized: (pixel / 255 - mean) / std"}


def write_aoti_meta(path, info, device, dynamic_batch):
    """`key value` lines (no JSON parser needed in C++); one `class` line per class, in order."""
    one_line = lambda s: " ".join(str(s).split())  # class names must not break the line format
    lines = ["# export.py sidecar for cpp/classify: `key value` per line, `class` lines in class order",
             f"format {AOTI_META_FORMAT}", f"model_name {info['model_name']}",
             f"model_options {json.dumps(info['model_options'])}", f"num_classes {info['num_classes']}",
             f"image_size {info['image_size']}", f"in_channels {info['in_channels']}",
             "mean " + " ".join(repr(m) for m in info["mean"]), "std " + " ".join(repr(s) for s in info["std"]),
             f"device {device.type}", f"dynamic_batch {int(dynamic_batch)}"]
    lines += [f"class {one_line(c)}" for c in info["classes"]]
    Path(path).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- export
def example_input(info, batch, device="cpu"):
    # Batch 2, not 1, for a dynamic batch: torch.export specializes sizes 0 and 1.
    return torch.randn(batch, info["in_channels"], info["image_size"], info["image_size"], device=device)


def export_onnx(model, info, path, *, opset=18, dynamic_batch=True, fp16=False):
    """Write `path` (.onnx) from an eval-mode model; returns the path of the external weights or None."""
    module = Float16(model) if fp16 else model
    x = example_input(info, 2 if dynamic_batch else 1)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    program = torch.onnx.export(module, (x,), dynamo=True, input_names=["input"], output_names=["logits"],
                                opset_version=opset, dynamic_shapes=dynamic_shapes, verbose=False)
    written = program.model.opset_imports.get("", program.model.opset_imports.get("ai.onnx"))
    if written != opset:  # the exporter falls back to its own opset when it cannot convert
        raise ValueError(f"--opset {opset}: the exporter wrote opset {written} instead; nothing written")
    program.model.metadata_props.update(onnx_metadata(info, fp16))
    path = Path(path)
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if weight_bytes > EXTERNAL_DATA_BYTES:
        program.save(path, external_data=True)  # protobuf cannot hold it: <name>.onnx.data beside it
        return path.with_name(path.name + ".data")
    tmp = path.with_name(f".{path.name}.tmp")  # write then rename: no half-written file on failure
    program.save(tmp, external_data=False)
    os.replace(tmp, path)
    return None


def export_aoti(model, info, path, *, device, dynamic_batch=True, fp16=False):
    """torch.export + AOTInductor -> `path` (.pt2) and `path`.meta; compiles C++ (and Triton on CUDA)."""
    module = (Float16(model) if fp16 else copy.deepcopy(model)).to(device)  # leave `model` on the CPU
    x = example_input(info, 2 if dynamic_batch else 1, device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    program = torch.export.export(module, (x,), dynamic_shapes=dynamic_shapes)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.pt2")  # the packager wants a .pt2 name
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    os.replace(tmp, path)
    write_aoti_meta(f"{path}.meta", info, device, dynamic_batch)
    return path


# --------------------------------------------------------------------------- onnxruntime
def ort_session(path, provider, *, threads=None, batch_shape=None, exact=False):
    """An InferenceSession on exactly `provider` ('tensorrt' | 'cuda' | 'cpu'); ValueError when that
    provider cannot run here. batch_shape (N, C, H, W): the only shape it will see (CUDA graphs, a
    TensorRT profile). exact: CUDA without TF32 (for --check: measure the export, not the arithmetic)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: no per-node placement warnings
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    device_id = str(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    cuda = {"device_id": device_id, "cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "0" if exact else "1"}
    trt = {"device_id": device_id}
    if batch_shape is not None:
        shape = "input:" + "x".join(map(str, batch_shape))  # one TensorRT profile at exactly this shape
        trt.update(trt_profile_min_shapes=shape, trt_profile_opt_shapes=shape, trt_profile_max_shapes=shape)
        # CUDA graphs replay one captured launch sequence: fixed shapes and fixed buffer addresses.
        cuda["enable_cuda_graph"] = "1" if provider == "cuda" else "0"
        trt["trt_cuda_graph_enable"] = "1"
    options = {PROVIDERS["tensorrt"]: trt, PROVIDERS["cuda"]: cuda, PROVIDERS["cpu"]: {}}
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        raise ValueError(f"onnxruntime {ort.__version__} has no {name} (it has {', '.join(available)})")
    chain = list(options)[list(options).index(name):]  # nodes a provider lacks go to the next one
    sess = ort.InferenceSession(str(path), so, providers=chain, provider_options=[options[p] for p in chain])
    if sess.get_providers()[0] != name:  # onnxruntime silently drops providers it cannot load
        raise ValueError(f"{name} cannot run here (missing CUDA/TensorRT libraries or GPU?); "
                         f"onnxruntime uses {sess.get_providers()}")
    return sess


def pick_provider(name, device):
    """auto: on a GPU TensorRT when its library loads, else CUDA; CPU otherwise."""
    if name != "auto":
        if name != "cpu" and device.type != "cuda":
            raise ValueError(f"--provider {name} needs a CUDA device (--device cuda)")
        return name
    if device.type != "cuda":
        return "cpu"
    try:
        ctypes.CDLL("libnvinfer.so.10")  # onnxruntime-gpu lists TensorRT even where TensorRT is not installed
    except OSError:
        return "cuda"
    return "tensorrt" if PROVIDERS["tensorrt"] in ort.get_available_providers() else "cuda"


class OrtRunner:
    """Runs a session on torch tensors. On CUDA, input and output stay on the GPU (I/O binding with
    the torch buffers' addresses): no host copies, as PyTorch has none."""

    def __init__(self, sess):
        self.sess, self.binding, self.key = sess, None, None
        self.on_cpu = sess.get_providers()[0] == PROVIDERS["cpu"]

    def __call__(self, x):
        if self.on_cpu:
            return torch.from_numpy(self.sess.run(["logits"], {"input": x.cpu().contiguous().numpy()})[0])
        x = x.contiguous()
        key = (tuple(x.shape), x.data_ptr())
        if key != self.key:  # CUDA graphs replay fixed addresses: bind once per buffer
            self.out = torch.empty(x.shape[0], self.sess.get_outputs()[0].shape[1], device=x.device)
            self.binding, dev = self.sess.io_binding(), x.device.index or 0
            self.binding.bind_input("input", "cuda", dev, np.float32, list(x.shape), x.data_ptr())
            self.binding.bind_output("logits", "cuda", dev, np.float32, list(self.out.shape), self.out.data_ptr())
            self.key = key
        self.sess.run_with_iobinding(self.binding)
        return self.out


# --------------------------------------------------------------------------- check
def real_images(ck, args, n):
    """Up to n normalized test images of the checkpoint's dataset, or None (and one line) if absent."""
    a = _args(ck)
    name = a.get("dataset")
    data_dir = args.data_dir or a.get("data_dir") or "data"
    if not name:
        print("note: the checkpoint does not record its dataset; checking on random inputs only")
        return None
    try:
        data = load_data(name, data_dir, image_size=ck["image_size"], channels=ck["in_channels"],
                         limit_test=n, seed=a.get("seed") or 0, download=False)
    except (ValueError, OSError) as e:
        print(f"note: no {name} test images ({str(e).splitlines()[0]}); checking on random inputs only")
        return None
    # The same rule as evaluate.py: images of other classes are refused (one line naming both lists).
    data, note = match_classes(data, model_info(ck)["classes"], args.checkpoint)
    if note:
        print(f"note: {note}")
    loader = make_loader(data.test, mean=ck["mean"], std=ck["std"], batch_size=n, train=False, workers=0,
                         image_size=ck["image_size"])
    return next(iter(loader))[0].cpu()


def check(runners, model, ck, args, device, real=None):
    """Every exported artifact vs PyTorch eager fp32 on the CPU, one line each: max |diff|, also
    relative to the logit scale (max |logit|), and top-1 agreement. ValueError past tolerance."""
    tolerance = args.tolerance or (3e-2 if args.fp16 else 1e-4)
    c, s = ck["in_channels"], ck["image_size"]
    inputs = {"random (7 images)": torch.randn(7, c, s, s, generator=torch.Generator().manual_seed(0))}
    if real is not None:
        inputs[f"real ({len(real)} images)"] = real
    failures = []
    for what, x in inputs.items():
        ref = model(x)
        scale = max(ref.abs().max().item(), 1e-12)
        for name, runner in runners.items():
            # A static-batch export takes one image at a time.
            out = torch.cat([runner(chunk.to(device)).float().cpu()
                             for chunk in x.split(len(x) if args.dynamic_batch else 1)])
            diff = (out - ref).abs().max().item()
            agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
            ok = diff <= tolerance * scale
            print(f"check {name:<4} {what:<18} max |diff| {diff:.2e} = {diff / scale:.2e} of max |logit| "
                  f"{scale:.3g}, top-1 agreement {agree:.2%}  {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{name} on {what}: max |diff| {diff:.2e} is {diff / scale:.2e} of the logit "
                                f"scale, over the tolerance {tolerance:g}")
    if failures:
        raise ValueError("check failed: " + "; ".join(failures))


# --------------------------------------------------------------------------- int8
CALIBRATION_BATCH = 64


def int8_data(ck, args):
    """The checkpoint's dataset with up to --calibration training images (a stratified sample, as
    --limit-train picks it) and the test split evaluate.py uses. ValueError (one line) when the
    training images are not on disk: int8 ranges from anything else would be a guess."""
    a = ck.get("args") or {}
    name = a.get("dataset")
    hint = "or pass --random-calibration to calibrate on random inputs (lower int8 accuracy)"
    if not name:
        raise ValueError(f"--int8: the checkpoint does not record its dataset, so there are no training images to "
                         f"calibrate on; {hint}")
    data_dir = args.data_dir or a.get("data_dir") or "data"
    try:
        data = load_data(name, data_dir, image_size=ck["image_size"], channels=ck["in_channels"],
                         val_split=a.get("val_split") or 0.0, limit_train=args.calibration,
                         limit_test=a.get("limit_test"), seed=a.get("seed") or 0, download=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"--int8: no {name} training images to calibrate on ({str(e).splitlines()[0]}); "
                         f"point --data-dir at them, {hint}") from None
    # Other classes are another dataset (refused, one line); the same ones listed in another order
    # are mapped, so that the int8 check scores the model's outputs against the right labels.
    data, note = match_classes(data, model_info(ck)["classes"], args.checkpoint)
    if note:
        print(f"note: {note}")
    return data


def normalized_batches(split, ck, batch_size):
    """float32 numpy batches (x, labels) of a split, normalized exactly as training normalizes."""
    loader = make_loader(split, mean=ck["mean"], std=ck["std"], batch_size=batch_size, train=False, workers=0,
                         image_size=ck["image_size"])
    for x, y in loader:
        yield x.cpu().numpy(), y.cpu().numpy()


def calibration_batches(ck, args, data):
    """(list of float32 N x C x H x W batches, description for the metadata)."""
    if data is None:  # --random-calibration
        c, s, n = ck["in_channels"], ck["image_size"], args.calibration
        x = np.random.default_rng(0).standard_normal((n, c, s, s), dtype=np.float32)
        return list(np.split(x, range(CALIBRATION_BATCH, n, CALIBRATION_BATCH))), \
            f"RANDOM: {n} standard normal inputs, not data (--random-calibration)"
    batches = [x for x, _ in normalized_batches(data.train, ck, CALIBRATION_BATCH)]
    n = sum(len(x) for x in batches)
    if n < args.calibration:
        print(f"note: {data.name} has {n} training images; calibrating on all of them")
    return batches, f"{data.name} train split, {n} images"


def quantize_int8(onnx_path, int8_path, batches, calibration):
    """Static post-training quantization of the fp32 ONNX file with onnxruntime: its pre-processing
    (symbolic shape inference, graph optimization) first, then QDQ nodes around every Conv/Gemm with
    per-channel int8 weights and uint8 activations, activation ranges (min/max) from `batches`.
    uint8 activations x int8 weights is the pair x86 CPUs run fastest (VPMADDUBSW / AVX-512 VNNI);
    int8 x int8 ran slower than fp32 on the development CPU. The fp32 file's metadata is carried
    over with precision int8 and the calibration data named."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"input": x}

    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=int8_path.parent) as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(onnx_path), str(pre))
        quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        model = onnx.load(str(out))
        props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        props.update(precision="int8", calibration=calibration)
        del model.metadata_props[:]
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(out))
        os.replace(out, int8_path)  # same folder: atomic, no half-written file on failure
    return int8_path


def check_int8(onnx_path, int8_path, ck, args, data, provider, threads):
    """fp32 and int8 ONNX side by side: top-1 of each on the test split and how often they agree
    (random inputs, agreement only, when no test images are on disk). ValueError when int8 loses
    more than --int8-max-drop points of top-1."""
    fp32 = ort_session(onnx_path, provider, threads=threads, exact=True)
    int8 = ort_session(int8_path, provider, threads=threads)
    run = lambda sess, x: sess.run(["logits"], {"input": x})[0].argmax(1)
    if data is None:
        try:
            data = int8_data(ck, args)
        except ValueError:
            pass
    if data is None or not len(data.test):
        x = np.random.default_rng(0).standard_normal((64, ck["in_channels"], ck["image_size"], ck["image_size"]),
                                                     dtype=np.float32)
        agree = (run(fp32, x) == run(int8, x)).mean()
        print("note: no test images for the int8 check; random inputs only")
        print(f"check int8 random (64 inputs): top-1 agreement with fp32 {agree:.2%}")
        return
    n = agree = right32 = right8 = 0
    batch = 1 if not args.dynamic_batch else 256
    for x, y in normalized_batches(data.test, ck, batch):
        p32, p8 = run(fp32, x), run(int8, x)
        n, agree = n + len(y), agree + (p32 == p8).sum()
        right32, right8 = right32 + (p32 == y).sum(), right8 + (p8 == y).sum()
    top32, top8 = right32 / n, right8 / n
    drop = 100 * (top32 - top8)
    ok = drop <= args.int8_max_drop
    print(f"check int8 on {n} {data.name} test images: top-1 fp32 {top32:.2%}, int8 {top8:.2%} "
          f"({100 * (top8 - top32):+.2f} points), agreement {agree / n:.2%}  {'ok' if ok else 'FAIL'}")
    if not ok:
        raise ValueError(f"check failed: int8 top-1 {top8:.2%} is {drop:.2f} points below fp32 {top32:.2%} "
                         f"(--int8-max-drop {args.int8_max_drop:g})")


# --------------------------------------------------------------------------- benchmark
def build_and_run_once(make, x, sync):
    """(runner, seconds to build it and run it once): compile, session creation, engine build."""
    t = time.perf_counter()
    runner = make()
    runner(x)
    sync()
    return runner, round(time.perf_counter() - t, 2)


def benchmark(model, info, onnx_path, aoti_path, args, device, provider, threads, rounds=5, int8_path=None):
    """Rows of {runtime, batch, median_ms, p90_ms, images_per_second, setup_s}. The runtimes take
    turns, `rounds` times, so that load from elsewhere on the machine slows them alike. int8_path:
    the quantized model too, as `onnxruntime <provider> int8`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    module = (Float16(model) if args.fp16 else copy.deepcopy(model)).to(device)
    ort_name = f"onnxruntime {provider}"
    rows = []
    for batch in args.batch_sizes:
        x = example_input(info, batch, device)
        runners, setup = {"pytorch eager": module}, {}
        with torch.inference_mode():
            if args.compile:
                torch._dynamo.reset()  # each batch size compiled from scratch: its own compile time
                runners["torch.compile"], setup["torch.compile"] = build_and_run_once(
                    lambda: torch.compile(module, dynamic=False), x, sync)
            if aoti_path is not None:
                runners["aotinductor"], setup["aotinductor"] = build_and_run_once(
                    lambda: torch._inductor.aoti_load_package(str(aoti_path)), x, sync)
            # On the GPU one session per shape: CUDA graphs and TensorRT profiles want fixed shapes.
            fixed = tuple(x.shape) if provider != "cpu" else None
            make = lambda shape: OrtRunner(ort_session(onnx_path, provider, threads=threads, batch_shape=shape))
            try:
                runners[ort_name], setup[ort_name] = build_and_run_once(lambda: make(fixed), x, sync)
            except Exception as e:  # e.g. shape nodes placed on the CPU, which CUDA graph capture refuses
                if fixed is None:
                    raise
                print(f"note: {provider} with CUDA graphs failed ({str(e).splitlines()[0][:150]}); timing without")
                runners[ort_name], setup[ort_name] = build_and_run_once(lambda: make(None), x, sync)
            if int8_path is not None:
                make8 = lambda shape: OrtRunner(ort_session(int8_path, provider, threads=threads, batch_shape=shape))
                try:
                    runners[f"{ort_name} int8"], setup[f"{ort_name} int8"] = build_and_run_once(
                        lambda: make8(fixed), x, sync)
                except Exception as e:
                    if fixed is None:
                        raise
                    print(f"note: int8 on {provider} with CUDA graphs failed ({str(e).splitlines()[0][:150]}); "
                          "timing without")
                    runners[f"{ort_name} int8"], setup[f"{ort_name} int8"] = build_and_run_once(
                        lambda: make8(None), x, sync)
            times = {name: [] for name in runners}
            for name, fn in runners.items():
                for _ in range(args.warmup):
                    fn(x)
            for r in range(rounds):  # the repeats, split over the rounds
                n = args.repeats // rounds + (r < args.repeats % rounds)
                for name, fn in runners.items():
                    times[name] += time_calls(lambda: fn(x), device=device, warmup=1, repeats=n)
        for name, t in times.items():
            med = float(np.median(t))
            rows.append({"runtime": name, "batch": batch, "median_ms": med * 1e3,
                         "p90_ms": float(np.percentile(t, 90)) * 1e3, "images_per_second": batch / med,
                         "setup_s": setup.get(name)})
    return rows


def print_table(rows):
    print("| runtime | batch | median ms | p90 ms | images/s | setup s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        setup = "" if r["setup_s"] is None else r["setup_s"]
        print(f"| {r['runtime']} | {r['batch']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
              f"{r['images_per_second']:,.0f} | {setup} |")


# --------------------------------------------------------------------------- main
def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--format", default="onnx", choices=("onnx", "aoti", "all"))
    p.add_argument("--out", default=None, help="output file (default: beside CKPT, <stem>.onnx / <stem>.pt2; "
                   "with --format all the suffix is replaced per format)")
    p.add_argument("--opset", type=int_range(MIN_OPSET, max_opset()), default=18,
                   help=f"ONNX opset, {MIN_OPSET}..{max_opset()} (the installed exporter's range; "
                   "18 runs on onnxruntime >= 1.14, TensorRT >= 8.6)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--dynamic-batch", action="store_true", default=True, help="dynamic batch axis (default)")
    batch.add_argument("--static-batch", dest="dynamic_batch", action="store_false", help="batch axis fixed to 1")
    p.add_argument("--fp16", action="store_true", help="float16 model with float32 input/output")
    p.add_argument("--int8", action="store_true", help="also <stem>.int8.onnx: static int8 quantization (QDQ, "
                   "per-channel weights) calibrated on training images of the checkpoint's dataset")
    p.add_argument("--calibration", type=int_range(1), default=512, metavar="N",
                   help="training images that calibrate --int8 (a stratified sample; never test images)")
    p.add_argument("--random-calibration", action="store_true",
                   help="--int8 without the training data: calibrate on random inputs (marked as such in the "
                        "output and the metadata; expect lower accuracy)")
    p.add_argument("--int8-max-drop", type=float_range(0, 100), default=1.0, metavar="POINTS",
                   help="--check fails when int8 top-1 is more than this many points below fp32")
    p.add_argument("--ema", action="store_true", help="export the EMA weights when the checkpoint has them")
    p.add_argument("--check", action="store_true", help="compare outputs with PyTorch (exit 1 past --tolerance)")
    p.add_argument("--tolerance", type=float_range(0, lo_open=True), default=None,
                   help="max |diff| / max |logit| allowed by --check (default 1e-4, 3e-2 with --fp16)")
    p.add_argument("--data-dir", default=None, help="dataset folder for --check (default: the checkpoint's)")
    p.add_argument("--benchmark", action="store_true", help="time eager / torch.compile / onnxruntime")
    p.add_argument("--provider", default="auto", choices=("auto", *PROVIDERS),
                   help="onnxruntime provider (auto: TensorRT, else CUDA on a GPU; CPU otherwise)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: cuda, then mps (Apple silicon), then cpu")
    p.add_argument("--batch-sizes", type=int_range(1), nargs="+", default=[1, 256])
    p.add_argument("--threads", type=int_range(1), default=None, help="CPU threads for torch and onnxruntime "
                   "alike (default: torch's default, the physical cores)")
    p.add_argument("--warmup", type=int_range(0), default=10, help="untimed calls per runtime and batch size")
    p.add_argument("--repeats", type=int_range(1), default=50, help="timed calls per runtime and batch size")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="include torch.compile in --benchmark (--no-compile skips it; compiling takes a while)")
    return p


def output_paths(args):
    ckpt = Path(args.checkpoint)
    base = Path(args.out) if args.out else ckpt.with_name(ckpt.stem + (".fp16" if args.fp16 else "") + ".onnx")
    formats = ["onnx", "aoti"] if args.format == "all" else [args.format]
    if args.out and args.format != "all":
        return {formats[0]: base}
    return {f: base.with_suffix(".onnx" if f == "onnx" else ".pt2") for f in formats}


def main(args):
    with out_of_memory_as_error("the model or a batch is too large for this device; use smaller --batch-sizes"):
        _main(args)


def _main(args):
    if any(b < 1 for b in args.batch_sizes) or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--batch-sizes and --repeats must be positive, --warmup non-negative")
    if args.benchmark and args.format == "aoti":
        raise ValueError("--benchmark times the ONNX model (and the .pt2 beside it): use --format onnx or all")
    if args.benchmark and not args.dynamic_batch and args.batch_sizes != [1]:
        print("note: --static-batch exports batch 1; benchmarking batch 1 only")
        args.batch_sizes = [1]
    if args.int8 and (args.fp16 or args.format == "aoti"):
        raise ValueError("--int8 quantizes the fp32 ONNX export: drop --fp16 and use --format onnx or all")
    if args.random_calibration and not args.int8:
        raise ValueError("--random-calibration calibrates --int8: add --int8")
    if not MIN_OPSET <= args.opset <= max_opset():
        raise ValueError(f"--opset {args.opset}: the installed exporter writes opsets {MIN_OPSET}..{max_opset()}")
    if args.threads is not None and args.threads < 1 or args.tolerance is not None and not args.tolerance > 0:
        raise ValueError("--threads must be >= 1 and --tolerance > 0")
    device = pick_device(args.device)
    ck = load_checkpoint(args.checkpoint)
    if args.ema and not ck.get("ema"):
        raise ValueError(f"--ema: {args.checkpoint} has no EMA weights")
    model = model_from_checkpoint(ck, ema=args.ema)  # eval mode, CPU
    info = model_info(ck)
    shape = (info["in_channels"], info["image_size"], info["image_size"])
    per_image, size = forward_bytes(model, shape), "x".join(map(str, shape))
    ensure_fits(per_image * 64, "cpu", f"the check and export inputs (up to 64 {size} images)",
                "the checkpoint's image_size is too large here")
    if args.benchmark:
        b = max(args.batch_sizes)
        ensure_fits(per_image * b, device, f"a benchmark batch of {b} {size} images", "use smaller --batch-sizes")
    run(args, ck, model, info, device)


def run(args, ck, model, info, device):
    """Export, check and benchmark, as main() set them up."""
    paths = output_paths(args)
    # Before anything is written: refuse --int8 when there is nothing to calibrate on.
    data8 = int8_data(ck, args) if args.int8 and not args.random_calibration else None
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    provider = pick_provider(args.provider, device)
    threads = args.threads or torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)  # the same count as onnxruntime's intra-op pool
    batch_note = "dynamic batch" if args.dynamic_batch else "batch 1"
    real = real_images(ck, args, 64) if args.check else None  # before exporting: a wrong folder fails fast
    onnx_path = paths.get("onnx")
    if onnx_path:
        t = time.perf_counter()
        external = export_onnx(model, info, onnx_path, opset=args.opset, dynamic_batch=args.dynamic_batch,
                               fp16=args.fp16)
        where = f" (weights > 2 GB: in {external})" if external else " (self-contained)"
        print(f"wrote {onnx_path}{where}: {info['model_name']}, opset {args.opset}, {batch_note}, "
              f"{'fp16' if args.fp16 else 'fp32'}, {time.perf_counter() - t:.1f} s")
    int8_path = None
    if args.int8:
        if external:
            raise ValueError("--int8: models with weights over 2 GB are not supported")
        t = time.perf_counter()
        batches, calibration = calibration_batches(ck, args, data8)
        if args.random_calibration:
            print("WARNING: int8 calibrated on RANDOM inputs, not data (--random-calibration): activation ranges "
                  "are a guess and accuracy will suffer; the metadata says so")
        int8_path = quantize_int8(onnx_path, onnx_path.with_name(onnx_path.stem + ".int8.onnx"), batches, calibration)
        print(f"wrote {int8_path}: int8 (QDQ, per-channel int8 weights, uint8 activations), calibration: "
              f"{calibration}, {time.perf_counter() - t:.1f} s")
    aoti_path = paths.get("aoti")
    if aoti_path:
        t = time.perf_counter()
        export_aoti(model, info, aoti_path, device=device, dynamic_batch=args.dynamic_batch, fp16=args.fp16)
        print(f"wrote {aoti_path} and {aoti_path}.meta: {device.type}, {batch_note}, "
              f"{time.perf_counter() - t:.1f} s")
    if args.check:
        runners = {}
        if onnx_path:
            runners["onnx"] = OrtRunner(ort_session(onnx_path, provider, threads=threads, exact=True))
        if aoti_path:
            runners["aoti"] = torch._inductor.aoti_load_package(str(aoti_path))
        with torch.inference_mode():
            check(runners, model, ck, args, device, real)
        if int8_path:
            check_int8(onnx_path, int8_path, ck, args, data8, provider, threads)
    if args.benchmark:
        rows = benchmark(model, info, onnx_path, aoti_path, args, device, provider, threads, int8_path=int8_path)
        print_table(rows)
        report = {"checkpoint": str(args.checkpoint), "onnx": str(onnx_path), "model": info["model_name"],
                  "input_shape": [info["in_channels"], info["image_size"], info["image_size"]],
                  "precision": "fp16" if args.fp16 else "fp32", "device": device_name(device),
                  "torch": torch.__version__, "onnxruntime": ort.__version__, "provider": provider,
                  "intra_op_threads": threads if device.type == "cpu" else None,
                  "warmup": args.warmup, "repeats": args.repeats, "results": rows}
        if int8_path:
            report.update(int8_onnx=str(int8_path), int8_calibration=calibration)
        json_path = onnx_path.with_suffix(".benchmark.json")
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}")


def cli(argv=None):
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
