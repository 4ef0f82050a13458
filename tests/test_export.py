"""export.py: ONNX parity with PyTorch for every model family (checked with onnxruntime itself),
metadata, the CLI's --check / --benchmark, unsafe checkpoints, and AOTInductor + cpp/classify."""
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import checkpoint
import data
import export
from data import load_data, make_loader
from models import build_model

REPO = Path(__file__).resolve().parent.parent

# One representative per family (and the variants that change the graph), at small inputs.
FAMILIES = [
    ("lenet5", 1, 28, {}),
    ("alexnet", 3, 32, {}),
    ("nin", 3, 32, {}),
    ("vgg11_bn", 3, 32, {}),
    ("googlenet", 3, 32, {"aux_logits": True, "residual": "projection"}),
    ("resnet18", 3, 32, {}),
    ("resnet20", 3, 32, {}),
    ("resnet20", 3, 32, {"plain": True}),
]


def classes_of(dataset, n):
    """The dataset's class names when it has n (export --check refuses images of other classes)."""
    names = data.DATASETS[dataset].classes if dataset in data.DATASETS else None
    return list(names) if names and len(names) == n else [f"class {i}" for i in range(n)]


def make_checkpoint(path, name="resnet20", in_channels=3, image_size=32, num_classes=10, dataset="synthetic",
                    data_dir="data", **options):
    """A checkpoint with the keys train.py writes, around a freshly initialised model."""
    torch.manual_seed(0)
    model = build_model(name, num_classes, in_channels, image_size, **options)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them into convs is tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ck = checkpoint.make_checkpoint(
        model_name=name, model_options=options, num_classes=num_classes, in_channels=in_channels,
        image_size=image_size, classes=classes_of(dataset, num_classes),
        mean=[0.5] * in_channels, std=[0.25] * in_channels,
        args={"dataset": dataset, "data_dir": str(data_dir), "seed": 0, "val_split": 0.0},
        epoch=1, model=model.state_dict())
    checkpoint.save(ck, path)
    return ck, model.eval()


def export_main(*argv):
    export.main(export.get_args_parser().parse_args([str(a) for a in argv]))


def ort_logits(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name,in_channels,image_size,options", FAMILIES,
                         ids=[f"{n}{'-' + '-'.join(o) if o else ''}" for n, _, _, o in FAMILIES])
def test_onnx_matches_pytorch(tmp_path, name, in_channels, image_size, options):
    ck, model = make_checkpoint(tmp_path / "m.pt", name, in_channels, image_size, **options)
    export_main(tmp_path / "m.pt")
    path = tmp_path / "m.onnx"  # default: beside the checkpoint
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert len(proto.graph.output) == 1  # GoogLeNet's aux heads are not exported
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    torch.manual_seed(1)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # the same file (and session) at two batch sizes
        x = torch.randn(batch, in_channels, image_size, image_size)
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert out.shape == ref.shape == (batch, 10)
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["model_name"] == name
    assert json.loads(meta["model_options"]) == options
    assert json.loads(meta["classes"]) == ck["classes"]
    assert json.loads(meta["mean"]) == ck["mean"] and json.loads(meta["std"]) == ck["std"]
    assert int(meta["image_size"]) == image_size and int(meta["in_channels"]) == in_channels
    # what a client needs to preprocess alone: channel order and the resize rule
    assert meta["channel_order"] == {1: "GRAY", 3: "RGB"}[in_channels]
    assert meta["resize"].startswith(f"stretch to {image_size}x{image_size}")
    assert "antialiased bilinear" in meta["resize"]


def test_fp16_and_static_batch(tmp_path):
    _, model = make_checkpoint(tmp_path / "m.pt", "resnet20")
    export_main(tmp_path / "m.pt", "--fp16")
    export_main(tmp_path / "m.pt", "--static-batch", "--out", tmp_path / "static.onnx")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    out = ort_logits(tmp_path / "m.fp16.onnx", x)  # float32 in and out, float16 inside
    assert out.dtype == np.float32 and np.abs(out - ref).max() <= 3e-2 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).all()
    proto = onnx.load(str(tmp_path / "static.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert np.abs(ort_logits(tmp_path / "static.onnx", x[:1]) - ref[:1]).max() <= 1e-4 * np.abs(ref).max()


def test_cli_check_and_benchmark(tmp_path, run):
    make_checkpoint(tmp_path / "m.pt", "resnet20")
    r = run("export.py", tmp_path / "m.pt", "--check", "--benchmark", "--no-compile", "--batch-sizes", "1", "3",
            "--warmup", "1", "--repeats", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "real (64 images)" in r.stdout and "random (7 images)" in r.stdout  # synthetic data is always there
    assert "FAIL" not in r.stdout
    report = json.loads((tmp_path / "m.benchmark.json").read_text())
    for key in ("device", "torch", "onnxruntime", "provider", "intra_op_threads"):
        assert report[key] is not None
    assert report["provider"] == "cpu" and report["intra_op_threads"] == 1
    rows = {(row["runtime"], row["batch"]) for row in report["results"]}
    assert rows == {(rt, b) for rt in ("pytorch eager", "onnxruntime cpu") for b in (1, 3)}
    assert all(row["images_per_second"] > 0 for row in report["results"])
    assert "| onnxruntime cpu | 3 |" in r.stdout


def test_check_without_data_uses_random_inputs(tmp_path, run):
    make_checkpoint(tmp_path / "m.pt", "lenet5", 1, 28, dataset="mnist", data_dir=tmp_path / "nowhere")
    r = run("export.py", tmp_path / "m.pt", "--check")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "random inputs only" in notes[0]
    assert "random (7 images)" in r.stdout and "real (" not in r.stdout


def test_check_fails_past_tolerance(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "m.pt", "lenet5", 1, 28)

    right = export.OrtRunner

    class Wrong:  # onnxruntime answering with logits that are off by 1
        def __init__(self, sess):
            self.run = right(sess)

        def __call__(self, x):
            return self.run(x) + 1.0

    monkeypatch.setattr(export, "OrtRunner", Wrong)
    with pytest.raises(ValueError, match="check failed: onnx on random") as e:
        export_main(tmp_path / "m.pt", "--check")
    assert "\n" not in str(e.value)


class Payload:
    """Pickles as a call to open(marker, 'w'): loading it with weights_only=False creates marker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_payload_is_refused(tmp_path, run):
    ck, _ = make_checkpoint(tmp_path / "m.pt", "lenet5", 1, 28)
    marker = tmp_path / "pwned"
    torch.save({**ck, "history": [Payload(str(marker))]}, tmp_path / "evil.pt")
    r = run("export.py", tmp_path / "evil.pt", "--check")
    assert r.returncode == 1
    assert r.stderr.startswith("error: refusing to load") and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "evil.onnx").exists()


def test_output_paths():
    parse = export.get_args_parser().parse_args
    assert export.output_paths(parse(["r/best.pt"])) == {"onnx": Path("r/best.onnx")}
    assert export.output_paths(parse(["r/best.pt", "--format", "all", "--out", "o/x.onnx"])) == \
        {"onnx": Path("o/x.onnx"), "aoti": Path("o/x.pt2")}
    assert export.output_paths(parse(["r/best.pt", "--format", "aoti"])) == {"aoti": Path("r/best.pt2")}


def write_ppm(path, rgb):
    """Binary PPM (P6) with a header comment, from uint8 H x W x 3."""
    h, w, _ = rgb.shape
    path.write_bytes(f"P6\n# test image\n{w} {h}\n255\n".encode() + rgb.tobytes())


def data_py_inputs(folder, images, size, channels, mean, std):
    """What data.py feeds the network for these pixels (HxWxC uint8/uint16 arrays, in order): the
    images as PNG files of an image folder, loaded and normalized by load_data + make_loader."""
    for split in ("train", "test"):
        (folder / split / "c").mkdir(parents=True)
    filler = np.zeros((size, size, 3), np.uint8)
    Image.fromarray(filler).save(folder / "train" / "c" / "0.png")
    (folder / "train" / "d").mkdir()  # a classifier needs two classes (data.py refuses one)
    Image.fromarray(filler).save(folder / "train" / "d" / "0.png")
    for i, a in enumerate(images):
        Image.fromarray(a if a.shape[2] == 3 else a[..., 0]).save(folder / "test" / "c" / f"{i}.png")
    d = load_data("folder", folder, image_size=size, channels=channels)
    assert len(d.test) == len(images)
    return next(iter(make_loader(d.test, mean=mean, std=std, batch_size=len(images), train=False, workers=0)))[0]


def test_aoti_package_runs_in_cpp(tmp_path, run):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not shutil.which("cmake") or not cxx:
        pytest.skip("cmake or a C++ compiler is missing: cannot build cpp/classify")
    ck, model = make_checkpoint(tmp_path / "lenet.pt", "lenet5", 1, 28)
    build = tmp_path / "build"
    # Build the C++ runner while the package compiles: they are independent.
    configure = ["cmake", "-S", REPO / "cpp", "-B", build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    cmake = subprocess.Popen(f"{shlex.join(map(str, configure))} && cmake --build {shlex.quote(str(build))} -j 2",
                             shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = run("export.py", tmp_path / "lenet.pt", "--format", "aoti", "--check", "--device", "cpu")
    log = cmake.communicate(timeout=600)[0]
    assert r.returncode == 0, r.stderr
    assert cmake.returncode == 0, log[-3000:]
    assert (tmp_path / "lenet.pt2").exists() and (tmp_path / "lenet.pt2.meta").exists()
    assert "check aoti" in r.stdout

    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)  # resized to 28 x 28
    rgb[:20, :25] = 255  # some structure, so the classes are not a near tie
    write_ppm(tmp_path / "img.ppm", rgb)
    out = subprocess.run([str(build / "classify"), str(tmp_path / "lenet.pt2"), str(tmp_path / "img.ppm")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line.split("\t") for line in out.stdout.strip().splitlines()]
    assert [int(rank) for _, rank, *_ in lines] == [1, 2, 3, 4, 5]
    assert all(image == str(tmp_path / "img.ppm") for image, *_ in lines)
    assert all(name == ck["classes"][int(index)] for _, _, index, name, _ in lines)
    # The package runs where it was compiled: another --device is refused before anything loads.
    wrong = subprocess.run([str(build / "classify"), str(tmp_path / "lenet.pt2"), str(tmp_path / "img.ppm"),
                            "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 1 and not wrong.stdout and len(wrong.stderr.strip().splitlines()) == 1
    assert wrong.stderr.startswith("error: --device cuda: ") and "was compiled for cpu" in wrong.stderr

    with torch.no_grad():  # the probabilities of data.py's input for the same pixels
        prob = model(data_py_inputs(tmp_path / "one", [rgb], 28, 1, ck["mean"], ck["std"])).softmax(1)[0]
    top = prob.topk(5)
    assert int(lines[0][2]) == top.indices[0].item()
    np.testing.assert_allclose([float(p) for *_, p in lines], top.values.numpy(), atol=2e-3)

    # The network inputs classify computes (--dump-input) equal data.py's for the same pixels, bit
    # for bit: RGB shrunk and enlarged (then PIL's luminance), gray shrunk, 16-bit gray (high byte).
    rng = np.random.default_rng(1)
    smooth = lambda *shape: (np.cumsum(rng.integers(0, 40, shape), axis=1) % 256).astype(np.uint8)
    images = {"0": smooth(40, 50, 3), "1": smooth(20, 17, 3), "2": smooth(31, 31, 1),
              "3": smooth(45, 30, 1).astype(np.uint16) * 257 + rng.integers(0, 256, (45, 30, 1)).astype(np.uint16)}
    ppms = []
    for name, a in images.items():
        ppm = tmp_path / f"{name}.{'ppm' if a.shape[2] == 3 else 'pgm'}"
        ppms.append(str(ppm))
        h, w, c = a.shape
        maxval = 65535 if a.dtype == np.uint16 else 255
        ppm.write_bytes(f"P{6 if c == 3 else 5}\n{w} {h}\n{maxval}\n".encode() + a.astype(a.dtype.newbyteorder(">")).tobytes())
    out = subprocess.run([str(build / "classify"), str(tmp_path / "lenet.pt2"), *ppms, "--dump-input",
                          str(tmp_path / "inputs.f32")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    dumped = np.fromfile(tmp_path / "inputs.f32", dtype="<f4").reshape(len(ppms), 1, 28, 28)
    x = data_py_inputs(tmp_path / "folder", list(images.values()), 28, 1, ck["mean"], ck["std"])
    np.testing.assert_array_equal(dumped, x.numpy())


# --------------------------------------------------------------------------- int8
def int8_metadata(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_int8_quantized_calibrated_on_training_images_checked_and_timed(tmp_path, monkeypatch, capsys):
    ck, model = make_checkpoint(tmp_path / "m.pt", "resnet20")  # the synthetic dataset: always on disk
    calibrated_on = []
    quantize = export.quantize_int8

    def spy(onnx_path, int8_path, batches, calibration):
        calibrated_on.extend(batches)
        return quantize(onnx_path, int8_path, batches, calibration)

    monkeypatch.setattr(export, "quantize_int8", spy)
    export_main(tmp_path / "m.pt", "--int8", "--calibration", "64", "--check", "--int8-max-drop", "100",
                "--benchmark", "--no-compile", "--batch-sizes", "3", "--warmup", "1", "--repeats", "2",
                "--threads", "1")
    out = capsys.readouterr().out

    # Calibrated on 64 training images (the stratified sample --limit-train 64 takes), normalized as
    # training normalizes them: not test images, not raw pixels.
    data = load_data("synthetic", limit_train=64)
    train_x = next(iter(make_loader(data.train, mean=ck["mean"], std=ck["std"], batch_size=64, train=False,
                                    workers=0)))[0]
    np.testing.assert_array_equal(np.concatenate(calibrated_on), train_x.numpy())

    # QDQ with per-channel int8 weights and uint8 activations; the fp32 file's metadata plus precision
    proto = onnx.load(str(tmp_path / "m.int8.onnx"))
    onnx.checker.check_model(proto)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 19  # resnet20: the stem and 18 in the blocks
    for conv in convs:
        dq = producer[conv.input[1]]  # weight <- DequantizeLinear(int8 initializer, per-channel scales)
        assert dq.op_type == "DequantizeLinear" and init[dq.input[0]].dtype == np.int8
        assert init[dq.input[1]].shape == (init[dq.input[0]].shape[0],)  # one scale per output channel
        act = producer[conv.input[0]]  # input <- DequantizeLinear(QuantizeLinear(x)) with uint8 zero point
        assert act.op_type == "DequantizeLinear" and init[act.input[2]].dtype == np.uint8
    meta8, meta32 = int8_metadata(tmp_path / "m.int8.onnx"), int8_metadata(tmp_path / "m.onnx")
    assert meta8 == {**meta32, "precision": "int8", "calibration": "synthetic train split, 64 images"}

    # --check's numbers, recomputed here with onnxruntime on the whole test split
    test_x, test_y = next(iter(make_loader(data.test, mean=ck["mean"], std=ck["std"], batch_size=len(data.test),
                                           train=False, workers=0)))
    p32 = ort_logits(tmp_path / "m.onnx", test_x)
    p8 = ort_logits(tmp_path / "m.int8.onnx", test_x)
    top32, top8 = (p32.argmax(1) == test_y.numpy()).mean(), (p8.argmax(1) == test_y.numpy()).mean()
    agree = (p32.argmax(1) == p8.argmax(1)).mean()
    assert (f"check int8 on {len(test_y)} synthetic test images: top-1 fp32 {top32:.2%}, int8 {top8:.2%} "
            f"({100 * (top8 - top32):+.2f} points), agreement {agree:.2%}  ok") in out
    with torch.no_grad():  # int8 is an approximation of the same model
        ref = model(test_x).numpy()
    assert np.abs(p8 - ref).max() <= 0.1 * np.abs(ref).max()

    report = json.loads((tmp_path / "m.benchmark.json").read_text())
    assert {r["runtime"] for r in report["results"]} == {"pytorch eager", "onnxruntime cpu", "onnxruntime cpu int8"}
    assert report["int8_calibration"] == "synthetic train split, 64 images"
    assert "| onnxruntime cpu int8 | 3 |" in out


def test_int8_refused_without_calibration_data_unless_random_is_asked(tmp_path, run, capsys):
    make_checkpoint(tmp_path / "m.pt", "lenet5", 1, 28, dataset="mnist", data_dir=tmp_path / "nowhere")
    r = run("export.py", tmp_path / "m.pt", "--int8")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: --int8: no mnist training images") and "--random-calibration" in r.stderr
    assert not list(tmp_path.glob("*.onnx"))  # refused before writing anything

    export_main(tmp_path / "m.pt", "--int8", "--random-calibration", "--calibration", "16", "--check")
    out = capsys.readouterr().out
    assert "WARNING: int8 calibrated on RANDOM inputs" in out
    assert "check int8 random (64 inputs)" in out  # no test images either: agreement on random inputs
    meta = int8_metadata(tmp_path / "m.int8.onnx")
    assert meta["precision"] == "int8" and meta["calibration"].startswith("RANDOM: 16 standard normal inputs")


def test_int8_check_fails_when_int8_loses_accuracy(tmp_path, monkeypatch):
    ck, _ = make_checkpoint(tmp_path / "m.pt", "lenet5", 1, 28)
    export_main(tmp_path / "m.pt", "--int8", "--calibration", "32")
    args = export.get_args_parser().parse_args([str(tmp_path / "m.pt"), "--int8"])
    data = export.int8_data(ck, args)
    fp32 = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    batches = export.normalized_batches

    def labelled_by_fp32(split, ck, batch_size):  # fp32 is right by definition: top-1 100%
        for x, _ in batches(split, ck, batch_size):
            yield x, fp32.run(None, {"input": x})[0].argmax(1)

    session = export.ort_session

    def broken_int8(path, *a, **k):  # int8 answering with the logits of the next class
        sess = session(path, *a, **k)
        if not str(path).endswith(".int8.onnx"):
            return sess
        return type("Rolled", (), {"run": lambda self, names, feed: [np.roll(sess.run(names, feed)[0], 1, 1)]})()

    monkeypatch.setattr(export, "normalized_batches", labelled_by_fp32)
    monkeypatch.setattr(export, "ort_session", broken_int8)
    with pytest.raises(ValueError, match=r"check failed: int8 top-1 .* points below fp32 100\.00%") as e:
        export.check_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", ck, args, data, 1)
    assert "\n" not in str(e.value)
