"""Export a checkpoint to ONNX and/or an AOTInductor package; check it against PyTorch; time it.

    python export.py runs/demo/best.pt                        # -> runs/demo/best.onnx
    python export.py runs/demo/best.pt --check --benchmark    # parity + latency table (+ .benchmark.json)
    python export.py runs/demo/best.pt --format aoti          # -> best.pt2 + best.pt2.meta for cpp/classify
    python export.py best.pt --device cuda --benchmark --batch-sizes 1 256 --fp16   # on a GPU
    python export.py runs/demo/best.pt --int8 --check         # + best.int8.onnx (512 training images)

ONNX: input "input" N x C x H x W float32, output "logits"; metadata_props hold classes, mean, std,
image_size, in_channels, channel order, resize rule and the model (docs/deploy.md). --int8: QDQ for
onnxruntime's CPU provider, calibrated on training images. --check: against PyTorch on random and real
test images, exit 1 past --tolerance. --benchmark: eager, torch.compile, the .pt2, onnxruntime: a table
and <stem>.benchmark.json; each row says its precision, layout and TF32.
"""
import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import onnxruntime as ort  # after torch: onnxruntime-gpu then finds the CUDA/cuDNN libraries torch loaded

from checkpoint import checkpoint_data, load_checkpoint, model_from_checkpoint
from data import make_loader
from predict import PROVIDERS, TENSORRT, loads, providers_for
from runtime import (device_name, ensure_fits, forward_bytes, number, one_line, pick_device, replacing,
                     run_cli, synchronize, time_calls, write_text)

AOTI_META_FORMAT = "deeper-networks-aoti/1"
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB cap, with room for the graph itself
# TensorRT builds TF32 engines and onnxruntime 1.31 has no option to stop it: TF32's 10-bit mantissa
# moves the logits by ~1e-3 of the largest one (measured by rounding conv/linear inputs on the CPU).
TF32_TOLERANCE = 1e-2
MIN_OPSET = 18  # torch.export's ONNX exporter starts here; its down-conversion fails (e.g. for Pad)


def max_opset():
    """The newest opset the installed exporter writes (torch's ONNX_MAX_OPSET, capped by onnx's)."""
    import onnx
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET as torch_max
    except ImportError:  # a torch that moved it: trust onnx's number
        torch_max = onnx.defs.onnx_opset_version()
    return min(torch_max, onnx.defs.onnx_opset_version())


class Float16(torch.nn.Module):
    """float32 in and out, float16 inside: the casts become nodes of the exported graph."""

    def __init__(self, model):
        super().__init__()
        self.model = copy.deepcopy(model).half()
        self.eval()

    def forward(self, x):
        return self.model(x.half()).float()


def model_info(ck, path):
    """What a deployment needs to know besides the weights (load_checkpoint checked the fields)."""
    if ck["mean"] is None or ck["std"] is None:  # a weights-only checkpoint may lack them
        raise ValueError(f"{path} records no mean/std: an export could not say how to normalize its input")
    keys = ("model_name", "model_options", "num_classes", "mean", "std", "image_size", "in_channels", "epoch")
    return {**{k: ck[k] for k in keys}, "classes": ck["classes"] or list(map(str, range(ck["num_classes"]))),
            "dataset": ck["args"].get("dataset")}


def aoti_meta(info, device, dynamic_batch):
    """`key value` lines (no JSON parser needed in C++); one `class` line per class, in order."""
    lines = ["# export.py sidecar for cpp/classify: `key value` per line, `class` lines in class order",
             f"format {AOTI_META_FORMAT}", f"model_name {info['model_name']}",
             f"model_options {json.dumps(info['model_options'])}", f"num_classes {info['num_classes']}",
             f"image_size {info['image_size']}", f"in_channels {info['in_channels']}",
             "mean " + " ".join(map(repr, info["mean"])), "std " + " ".join(map(repr, info["std"])),
             f"device {device.type}", f"dynamic_batch {int(dynamic_batch)}"]
    return "\n".join(lines + [f"class {one_line(c)}" for c in info["classes"]]) + "\n"


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
    size = info["image_size"]
    meta = {**info, "input_name": "input", "output_name": "logits", "precision": "fp16" if fp16 else "fp32",
            "layout": "NCHW, float32, normalized: (pixel / 255 - mean) / std",
            "channel_order": {1: "GRAY", 3: "RGB"}.get(info["in_channels"]),  # GRAY: PIL's convert("L")
            "resize": f"stretch to {size}x{size} (no crop, aspect ratio not kept), antialiased bilinear "
                      "(torchvision's resize = PIL's triangle filter) on uint8 pixels, rounded to uint8"}
    program.model.metadata_props.update(  # str -> str: lists and dicts as JSON
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if v is not None})
    if sum(t.numel() * t.element_size() for t in module.state_dict().values()) > EXTERNAL_DATA_BYTES:
        # In place: the .onnx names its <name>.onnx.data, which a renamed temp file would not find.
        program.save(path, external_data=True)
        return Path(f"{path}.data")
    with replacing(path) as tmp:
        program.save(tmp, external_data=False)
    return None


def export_aoti(model, info, path, *, device, dynamic_batch=True, fp16=False):
    """torch.export + AOTInductor -> `path` (.pt2) and `path`.meta; compiles C++ (and Triton on CUDA)."""
    module = (Float16(model) if fp16 else copy.deepcopy(model)).to(device)  # leave `model` on the CPU
    x = example_input(info, 2 if dynamic_batch else 1, device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    program = torch.export.export(module, (x,), dynamic_shapes=dynamic_shapes)
    with replacing(path) as tmp:  # tmp keeps the .pt2 suffix the packager wants
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    write_text(f"{path}.meta", aoti_meta(info, device, dynamic_batch))


def ort_session(path, provider, *, threads=None, batch_shape=None, exact=False):
    """An InferenceSession on exactly `provider` ('tensorrt' | 'cuda' | 'cpu'), else ValueError. batch_shape
    (N, C, H, W): the only shape it will see (CUDA graphs, a TensorRT profile). exact: CUDA without TF32."""
    so = ort.SessionOptions()  # all graph optimizations: onnxruntime's default
    so.log_severity_level = 3  # errors only: no per-node placement warnings
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    device_id = str(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    cuda = {"device_id": device_id, "cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "0" if exact else "1"}
    trt = {"device_id": device_id}
    if batch_shape is not None:
        s = "input:" + "x".join(map(str, batch_shape))  # one TensorRT profile at exactly this shape
        # CUDA graphs replay one captured launch sequence: fixed shapes and fixed buffer addresses.
        trt.update({f"trt_profile_{k}_shapes": s for k in ("min", "opt", "max")}, trt_cuda_graph_enable="1")
        cuda["enable_cuda_graph"] = "1" if provider == "cuda" else "0"
    options = {PROVIDERS["tensorrt"]: trt, PROVIDERS["cuda"]: cuda, PROVIDERS["cpu"]: {}}
    name = PROVIDERS[provider]
    if provider == "tensorrt":
        loads(TENSORRT)  # also from pip's TensorRT wheel, whose folder the loader does not search
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
    """auto: TensorRT on a GPU if its library loads, else CUDA (predict.providers_for says why); else CPU."""
    if name not in ("auto", "cpu") and device.type != "cuda":
        raise ValueError(f"--provider {name} needs a CUDA device (--device cuda)")
    if name != "auto" or device.type != "cuda":
        return "cpu" if name == "auto" else name
    return "tensorrt" if providers_for("auto")[0] == PROVIDERS["tensorrt"] else "cuda"


class OrtRunner:
    """A session on torch tensors; on CUDA, input and output stay on the GPU (I/O binding), as PyTorch's.
    graphs: CUDA graphs read the addresses bound at capture: the first input stays bound, others copied in."""

    def __init__(self, sess, graphs=False):
        self.sess, self.graphs, self.binding, self.x = sess, graphs, None, None
        self.on_cpu = sess.get_providers()[0] == PROVIDERS["cpu"]

    def __call__(self, x):
        if self.on_cpu:
            return torch.from_numpy(self.sess.run(["logits"], {"input": x.cpu().contiguous().numpy()})[0])
        x = x.contiguous()
        if self.graphs and self.x is not None:
            if x.shape != self.x.shape:
                raise ValueError(f"a CUDA-graph session runs {list(self.x.shape)} only, not {list(x.shape)}")
            if x.data_ptr() != self.x.data_ptr():
                self.x.copy_(x)
                synchronize(x.device)  # onnxruntime reads it on a stream of its own
        elif self.x is None or (x.shape, x.data_ptr()) != (self.x.shape, self.x.data_ptr()):
            out = self.out = torch.empty(x.shape[0], self.sess.get_outputs()[0].shape[1], device=x.device)
            self.binding, dev, self.x = self.sess.io_binding(), x.device.index or 0, x
            self.binding.bind_input("input", "cuda", dev, np.float32, list(x.shape), x.data_ptr())
            self.binding.bind_output("logits", "cuda", dev, np.float32, list(out.shape), out.data_ptr())
        self.sess.run_with_iobinding(self.binding)
        return self.out


def load_data_of(ck, args, **limits):
    """(the checkpoint's data, None) or (None, why not); other classes' data: ValueError (wrong labels)."""
    if not ck["args"].get("dataset"):
        return None, f"{args.checkpoint} does not record its dataset"
    try:
        return checkpoint_data(ck, args.checkpoint, data_dir=args.data_dir, **limits), None
    except (ValueError, OSError) as e:
        if "was trained" in str(e):  # checkpoint_data's class mismatch: the data is there, but another
            raise
        return None, one_line(e, 200)


def normalized_batches(split, ck, batch_size):
    """float32 numpy batches (x, labels) of a split, normalized exactly as training normalizes."""
    loader = make_loader(split, mean=ck["mean"], std=ck["std"], batch_size=batch_size, train=False, workers=0)
    return ((x.numpy(), y.numpy()) for x, y in loader)  # a CPU loader: checkpoint_data made ck's image size


@contextlib.contextmanager
def cuda_flags(tf32, benchmark=False):
    """TF32 (cuBLAS and cuDNN) and cuDNN's algorithm search for a block, as they were after it."""
    b = torch.backends
    saved = b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark = tf32, tf32, benchmark
    try:
        yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark = saved


@cuda_flags(tf32=False)  # the .pt2 (and any torch runner) in full fp32, as the CPU reference
def check(runners, model, ck, args, device, real=None, tf32=()):
    """Every exported artifact vs PyTorch eager fp32 on the CPU, one line each: max |diff| (also over max
    |logit|), top-1 agreement; ValueError past tolerance. tf32: runners stuck with TF32 (TF32_TOLERANCE)."""
    c, s = ck["in_channels"], ck["image_size"]
    inputs = {"random (7 images)": torch.randn(7, c, s, s, generator=torch.Generator().manual_seed(0)),
              **({} if real is None else {f"real ({len(real)} images)": real})}
    failures = []
    for what, x in inputs.items():
        ref = model(x)
        scale = max(ref.abs().max().item(), 1e-12)
        for name, runner in runners.items():
            out = torch.cat([runner(chunk.to(device)).float().cpu()  # static batch: one image at a time
                             for chunk in x.split(len(x) if args.dynamic_batch else 1)])
            diff = (out - ref).abs().max().item()
            agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
            tolerance = args.tolerance or (3e-2 if args.fp16 else TF32_TOLERANCE if name in tf32 else 1e-4)
            ok = diff <= tolerance * scale
            tf = ", TF32 on (TensorRT)" if name in tf32 else ", TF32 off" if device.type == "cuda" else ""
            print(f"check {name:<4} {what:<18} max |diff| {diff:.2e} = {diff / scale:.2e} of max |logit| "
                  f"{scale:.3g}, top-1 agreement {agree:.2%}{tf}, tolerance {tolerance:g}  "
                  f"{'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{name} on {what}: max |diff| {diff:.2e} is {diff / scale:.2e} of the logit "
                                f"scale, over the tolerance {tolerance:g}")
    if failures:
        raise ValueError("check failed: " + "; ".join(failures))


def int8_data(ck, args):
    """The data with --calibration training images (stratified), else ValueError: other ranges are a guess."""
    data, why = load_data_of(ck, args, limit_train=args.calibration)
    if data is None:
        raise ValueError(f"--int8: no {ck['args'].get('dataset') or 'recorded'} training images to "
                         f"calibrate on ({why}); point --data-dir at them, or pass --random-calibration "
                         "to calibrate on random inputs (lower int8 accuracy)")
    return data


def calibration_batches(ck, args, data):
    """(list of float32 N x C x H x W batches, description for the metadata)."""
    size = 64 if args.dynamic_batch else 1  # a static-batch export takes one image at a time
    if data is None:  # --random-calibration
        c, s, n = ck["in_channels"], ck["image_size"], args.calibration
        x = np.random.default_rng(0).standard_normal((n, c, s, s), dtype=np.float32)
        print("WARNING: int8 calibrated on RANDOM inputs, not data (--random-calibration): activation ranges "
              "are a guess and accuracy will suffer; the metadata says so")
        return list(np.split(x, range(size, n, size))), \
            f"RANDOM: {n} standard normal inputs, not data (--random-calibration)"
    batches = [x for x, _ in normalized_batches(data.train, ck, size)]
    n = sum(len(x) for x in batches)
    if n < args.calibration:
        print(f"note: {data.name} has {n} training images; calibrating on all of them")
    return batches, f"{data.name} train split, {n} images"


def quantize_int8(onnx_path, int8_path, batches, calibration):
    """Static QDQ quantization: per-channel int8 weights, uint8 activations (x86's fastest pair: VNNI), ranges
    from `batches`, the fp32 metadata + precision, calibration. CPU only (TensorRT refuses it, CUDA: fp32)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    feeds = iter([{"input": x} for x in batches])
    reader = SimpleNamespace(get_next=lambda: next(feeds, None))  # all a CalibrationDataReader needs
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    with replacing(int8_path) as tmp:  # pre-processed into tmp, then quantized in place
        quant_pre_process(str(onnx_path), str(tmp))
        quantize_static(tmp, tmp, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {**props, "precision": "int8", "calibration": calibration})
        onnx.save(model, str(tmp))
    return Path(int8_path)


def check_int8(onnx_path, int8_path, ck, args, data, threads):
    """fp32 and int8 top-1 on the test split and their agreement (on random inputs agreement only),
    on the CPU provider, the one the file is for; ValueError when int8 loses > --int8-max-drop points."""
    fp32, int8 = (ort_session(p, "cpu", threads=threads) for p in (onnx_path, int8_path))
    step = 256 if args.dynamic_batch else 1  # a static-batch export takes one image at a time
    run = lambda sess, x: np.concatenate([sess.run(["logits"], {"input": x[i:i + step]})[0].argmax(1)  # noqa
                                          for i in range(0, len(x), step)])
    data = data or load_data_of(ck, args)[0]  # --random-calibration: the test split may still be there
    if data is None or not len(data.test):
        c, s = ck["in_channels"], ck["image_size"]
        x = np.random.default_rng(0).standard_normal((64, c, s, s), dtype=np.float32)
        print("note: no test images for the int8 check; random inputs only\ncheck int8 random (64 inputs): "
              f"top-1 agreement with fp32 {(run(fp32, x) == run(int8, x)).mean():.2%}")
        return
    p32, p8, y = map(np.concatenate, zip(*[(run(fp32, x), run(int8, x), y)
                                          for x, y in normalized_batches(data.test, ck, 256)]))
    top32, top8 = (p32 == y).mean(), (p8 == y).mean()
    drop = 100 * (top32 - top8)
    ok = drop <= args.int8_max_drop
    print(f"check int8 on {len(y)} {data.name} test images: top-1 fp32 {top32:.2%}, int8 {top8:.2%} "
          f"({100 * (top8 - top32):+.2f} points), agreement {(p32 == p8).mean():.2%}  "
          f"{'ok' if ok else 'FAIL'}")
    if not ok:
        raise ValueError(f"check failed: int8 top-1 {top8:.2%} is {drop:.2f} points below fp32 {top32:.2%} "
                         f"(--int8-max-drop {args.int8_max_drop:g})")


@cuda_flags(tf32=True, benchmark=True)  # as onnxruntime: TF32 (TensorRT cannot turn it off), algorithm search
def benchmark(model, info, onnx_path, aoti_path, args, device, provider, threads, rounds=5, int8_path=None):
    """Rows of {runtime, batch, median_ms, p90_ms, images_per_second, setup_s, precision, layout,
    tf32}. The runtimes take turns, `rounds` times, so that load from elsewhere slows them alike."""
    module = (Float16(model) if args.fp16 else copy.deepcopy(model)).to(device)
    onnx_files = {f"onnxruntime {provider}": onnx_path, f"onnxruntime {provider} int8": int8_path}
    rows = []
    for batch in args.batch_sizes:
        x = example_input(info, batch, device)
        runners, setup = {"pytorch eager": module}, {}

        def build(name, make):  # setup_s: compile, session creation, engine build, and a first run
            t = time.perf_counter()
            runners[name] = make()
            runners[name](x)
            synchronize(device)
            setup[name] = round(time.perf_counter() - t, 2)
        with torch.inference_mode():
            if args.compile:
                torch._dynamo.reset()  # each batch size compiled from scratch: its own compile time
                build("torch.compile", lambda: torch.compile(module, dynamic=False))
            if aoti_path is not None:
                build("aotinductor", lambda: torch._inductor.aoti_load_package(str(aoti_path)))
            # On the GPU one session per shape: CUDA graphs and TensorRT profiles want fixed shapes.
            fixed = tuple(x.shape) if provider != "cpu" else None
            for name, path in ((n, p) for n, p in onnx_files.items() if p is not None):
                make = lambda shape=None: OrtRunner(  # noqa: E731
                    ort_session(path, provider, threads=threads, batch_shape=shape), graphs=shape is not None)
                try:
                    build(name, lambda: make(fixed))
                except Exception as e:  # e.g. shape nodes placed on the CPU, which CUDA graph capture refuses
                    if fixed is None:
                        raise
                    print(f"note: {name} with CUDA graphs failed ({one_line(e, 150)}); timing without")
                    build(name, make)
            for fn in runners.values():
                for _ in range(args.warmup):
                    fn(x)
            times = {name: [] for name in runners}
            for r in range(rounds):  # the repeats, split over the rounds
                n = args.repeats // rounds + (r < args.repeats % rounds)
                for name, fn in runners.items():
                    times[name] += time_calls(lambda: fn(x), device=device, warmup=1, repeats=n)
        for name, t in times.items():
            med = float(np.median(t))
            precision = "int8" if name.endswith("int8") else "fp16" if args.fp16 else "fp32"
            rows.append({"runtime": name, "batch": batch, "median_ms": med * 1e3,
                         "p90_ms": float(np.percentile(t, 90)) * 1e3, "images_per_second": batch / med,
                         "setup_s": setup.get(name), "precision": precision, "layout": "NCHW",
                         "tf32": device.type == "cuda" and precision == "fp32"})
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("checkpoint", metavar="CKPT")
    a("--format", default="onnx", choices=("onnx", "aoti", "all"))
    a("--out", help="output file (default: beside CKPT, <stem>.onnx / .pt2; --format all: per format)")
    a("--opset", type=number(int, MIN_OPSET, max_opset()), default=18,
      help="ONNX opset in the installed exporter's range (18 runs on onnxruntime >= 1.14, TensorRT >= 8.6)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--dynamic-batch", action="store_true", default=True, help="dynamic batch (default)")
    batch.add_argument("--static-batch", dest="dynamic_batch", action="store_false", help="batch fixed to 1")
    a("--fp16", action="store_true", help="float16 model with float32 input/output")
    a("--int8", action="store_true", help="also <stem>.int8.onnx: static int8 quantization (QDQ, per-channel "
      "weights) calibrated on training images of the checkpoint's dataset")
    a("--calibration", type=number(int, 1), default=512, metavar="N",
      help="training images that calibrate --int8 (a stratified sample; never test images)")
    a("--random-calibration", action="store_true", help="--int8 without the training data: calibrate on "
      "random inputs (marked as such in the output and the metadata; expect lower accuracy)")
    a("--int8-max-drop", type=number(float, 0, 100), default=1.0, metavar="POINTS",
      help="--check fails when int8 top-1 is more than this many points below fp32")
    a("--ema", action="store_true", help="export the EMA weights when the checkpoint has them")
    a("--check", action="store_true", help="compare outputs with PyTorch (exit 1 past --tolerance)")
    a("--tolerance", type=number(float, 0, lo_open=True),
      help="max |diff| / max |logit| allowed by --check (default 1e-4, 3e-2 with --fp16)")
    a("--data-dir", help="dataset folder for --check and --int8 (default: the checkpoint's)")
    a("--benchmark", action="store_true", help="time eager / torch.compile / onnxruntime")
    a("--provider", default="auto", choices=("auto", *PROVIDERS),
      help="onnxruntime provider (auto: TensorRT, else CUDA on a GPU; CPU otherwise)")
    a("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="auto: cuda, mps, cpu")
    a("--batch-sizes", type=number(int, 1), nargs="+", default=[1, 256])
    a("--threads", type=number(int, 1), help="CPU threads of torch and onnxruntime (default: torch's)")
    a("--warmup", type=number(int, 0), default=10, help="untimed calls per runtime and batch size")
    a("--repeats", type=number(int, 1), default=50, help="timed calls per runtime and batch size")
    a("--compile", action=argparse.BooleanOptionalAction, default=True,
      help="time torch.compile in --benchmark (--no-compile skips it: compiling takes a while)")
    return p


def output_paths(args):
    """{format: path}: --out for one format; else the ONNX path (--out or beside CKPT) per format."""
    base = Path(args.out or Path(args.checkpoint).with_suffix(".fp16.onnx" if args.fp16 else ".onnx"))
    if args.out and args.format != "all":
        return {args.format: base}
    return {f: base.with_suffix(suffix) for f, suffix in (("onnx", ".onnx"), ("aoti", ".pt2"))
            if args.format in (f, "all")}


def main(args):
    if args.benchmark and args.format == "aoti":
        raise ValueError("--benchmark times the ONNX model (and the .pt2 beside it): use --format onnx/all")
    if args.benchmark and not args.dynamic_batch and args.batch_sizes != [1]:
        print("note: --static-batch exports batch 1; benchmarking batch 1 only")
        args.batch_sizes = [1]
    if args.int8 and (args.fp16 or args.format == "aoti"):
        raise ValueError("--int8 quantizes the fp32 ONNX export: drop --fp16 and use --format onnx or all")
    if args.random_calibration and not args.int8:
        raise ValueError("--random-calibration calibrates --int8: add --int8")
    device, ck = pick_device(args.device), load_checkpoint(args.checkpoint)
    if args.ema and not ck["ema"]:
        raise ValueError(f"--ema: {args.checkpoint} has no EMA weights")
    model, info = model_from_checkpoint(ck, ema=args.ema), model_info(ck, args.checkpoint)  # eval, CPU
    shape = (info["in_channels"], info["image_size"], info["image_size"])
    per_image, size = forward_bytes(model, shape), "x".join(map(str, shape))
    ensure_fits(per_image * 64, "cpu", f"the check and export inputs (up to 64 {size} images)",
                "the checkpoint's image_size is too large here")
    if args.benchmark:
        b = max(args.batch_sizes)
        ensure_fits(per_image * b, device, f"a benchmark batch of {b} {size} images", "lower --batch-sizes")
    # Before anything is written: --int8 with nothing to calibrate on, and data of other classes, fail.
    data8 = int8_data(ck, args) if args.int8 and not args.random_calibration else None
    test, why = load_data_of(ck, args, limit_test=64) if args.check else (None, None)
    if why:
        print(f"note: no test images ({why}); checking on random inputs only")
    real = torch.from_numpy(next(normalized_batches(test.test, ck, 64))[0]) if test else None
    paths = output_paths(args)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    provider, threads = pick_provider(args.provider, device), args.threads or torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)  # the same count as onnxruntime's intra-op pool
    batch_note = "dynamic batch" if args.dynamic_batch else "batch 1"
    onnx_path, aoti_path, int8_path = paths.get("onnx"), paths.get("aoti"), None
    if onnx_path:
        t = time.perf_counter()
        external = export_onnx(model, info, onnx_path, opset=args.opset, dynamic_batch=args.dynamic_batch,
                               fp16=args.fp16)
        print(f"wrote {onnx_path} ({f'weights > 2 GB: in {external}' if external else 'self-contained'}): "
              f"{info['model_name']}, opset {args.opset}, {batch_note}, "
              f"{'fp16' if args.fp16 else 'fp32'}, {time.perf_counter() - t:.1f} s")
    if args.int8:
        if external:
            raise ValueError("--int8: models with weights over 2 GB are not supported")
        t = time.perf_counter()
        batches, calibration = calibration_batches(ck, args, data8)
        int8_path = quantize_int8(onnx_path, onnx_path.with_suffix(".int8.onnx"), batches, calibration)
        print(f"wrote {int8_path}: int8 (QDQ, per-channel int8 weights, uint8 activations), calibration: "
              f"{calibration}, {time.perf_counter() - t:.1f} s")
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
            check(runners, model, ck, args, device, real, tf32=("onnx",) if provider == "tensorrt" else ())
        if int8_path:
            check_int8(onnx_path, int8_path, ck, args, data8, threads)
    if args.benchmark:
        int8_note = None if provider == "cpu" or not int8_path else (
            f"int8 not timed on {provider}: the QDQ file is for onnxruntime's CPU provider (on {provider} "
            "it would run fp32 convolutions between Quantize/DequantizeLinear, not int8)")
        if int8_note:
            print(f"note: {int8_note}")
        rows = benchmark(model, info, onnx_path, aoti_path, args, device, provider, threads,
                         int8_path=None if int8_note else int8_path)
        print("| runtime | batch | median ms | p90 ms | images/s | setup s | ran |\n"
              "|---|---:|---:|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r['runtime']} | {r['batch']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
                  f"{r['images_per_second']:,.0f} | {'' if r['setup_s'] is None else r['setup_s']} | "
                  f"{r['precision']}, {r['layout']}, TF32 {'on' if r['tf32'] else 'off'} |")
        report = {"checkpoint": str(args.checkpoint), "onnx": str(onnx_path), "model": info["model_name"],
                  "input_shape": list(shape), "precision": "fp16" if args.fp16 else "fp32",
                  "device": device_name(device), "torch": torch.__version__, "onnxruntime": ort.__version__,
                  "provider": provider, "intra_op_threads": threads if device.type == "cpu" else None,
                  "warmup": args.warmup, "repeats": args.repeats, "results": rows, **({} if not int8_path else
                  {"int8_onnx": str(int8_path), "int8_calibration": calibration, "int8_note": int8_note})}
        json_path = onnx_path.with_suffix(".benchmark.json")
        write_text(json_path, json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}")


def cli(argv=None):
    return run_cli(main, get_args_parser(), argv,
                   oom_hint="the model or a batch is too large for this device; use smaller --batch-sizes")


if __name__ == "__main__":
    sys.exit(cli())
