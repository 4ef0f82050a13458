"""The GPU paths' logic on the CPU, with fakes for what needs a GPU: device memory counters, provider
lists, library loading, onnxruntime sessions. What only a GPU can show is left to gpu_check.sh."""
import argparse
import ctypes
import hashlib
import json
import sys
from types import SimpleNamespace

import pytest
import torch

import bench
import export
import predict
from test_export import make_checkpoint

TRT, CUDA, CPU = (predict.PROVIDERS[k] for k in ("tensorrt", "cuda", "cpu"))


# --------------------------------------------------------------------------- export --check: TF32
def test_check_runs_torch_without_tf32_and_names_tensorrts_tolerance(capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    ck = {"in_channels": 1, "image_size": 4}
    args = argparse.Namespace(tolerance=None, fp16=False, dynamic_batch=True)
    seen = []

    def tf32_sized_error(x):  # what TF32 arithmetic does to fp32 logits: ~1e-3 of the largest one
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        out = model(x)
        return out + 1e-3 * out.abs().max()

    b = torch.backends
    b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = True
    try:
        with torch.no_grad():
            export.check({"onnx": tf32_sized_error}, model, ck, args, torch.device("cpu"), tf32=("onnx",))
            assert "TF32 on (TensorRT), tolerance 0.01  ok" in capsys.readouterr().out
            with pytest.raises(ValueError, match="check failed: aoti .* over the tolerance 0.0001"):
                export.check({"aoti": tf32_sized_error}, model, ck, args, torch.device("cpu"))
        assert seen and all(flags == (False, False) for flags in seen)  # torch ran in full fp32
        assert (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32) == (True, True)  # and the flags came back
    finally:
        b.cuda.matmul.allow_tf32 = False  # torch's defaults


# --------------------------------------------------------------------------- CUDA graphs: one input buffer
class FakeCudaSession:
    """onnxruntime's I/O binding as CUDA graphs see it: a run reads the buffer bound at capture."""

    def __init__(self):
        self.bound, self.read = [], []

    def get_providers(self):
        return [CUDA, CPU]

    def get_outputs(self):
        return [SimpleNamespace(shape=["batch", 3])]

    def io_binding(self):
        return SimpleNamespace(bind_input=lambda name, dev, i, t, shape, ptr: self.bound.append(ptr),
                               bind_output=lambda *a: None)

    def run_with_iobinding(self, binding):
        self.read.append(self.bound[0])  # the address captured first, whatever was bound later


def test_cuda_graph_runner_keeps_one_input_buffer():
    sess = FakeCudaSession()
    run = export.OrtRunner(sess, graphs=True)
    first, second = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    run(first)
    run(second)  # another buffer of the same shape: its values go to the captured one
    assert sess.bound == [first.data_ptr()] and sess.read == [first.data_ptr()] * 2
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match=r"runs \[2, 1, 4, 4\] only, not \[3, 1, 4, 4\]"):
        run(torch.zeros(3, 1, 4, 4))
    plain = export.OrtRunner(FakeCudaSession())  # without graphs (--check): each buffer is bound
    plain(first)
    plain(torch.zeros(3, 1, 4, 4))
    assert len(plain.sess.bound) == 2


# --------------------------------------------------------------------------- benchmark fairness
def test_export_benchmark_rows_say_what_ran_with_cudnn_search_and_tf32_on():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32))
            return x.flatten(1)[:, :3]

    args = argparse.Namespace(fp16=False, batch_sizes=[2], compile=False, warmup=0, repeats=1)
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    rows = export.benchmark(Probe(), {"in_channels": 1, "image_size": 2}, None, None, args,
                            torch.device("cpu"), "cpu", 1)
    assert seen and set(seen) == {(True, True)}  # as onnxruntime: algorithm search, TF32 where there is TF32
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == before
    assert [(r["runtime"], r["precision"], r["layout"], r["tf32"]) for r in rows] == \
        [("pytorch eager", "fp32", "NCHW", False)]  # a CPU has no TF32


def test_bench_labels_tf32_runs_tf32():
    cuda, saved = torch.device("cuda"), torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert [bench.precision(a, cuda) for a in (None, torch.bfloat16)] == ["tf32", "bf16"]
        assert bench.precision(None, torch.device("cpu")) == "fp32"
        torch.backends.cudnn.allow_tf32 = False
        assert bench.precision(None, cuda) == "fp32"
    finally:
        torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------- bench.py peak memory
def test_peak_memory_is_each_configuration_alone(monkeypatch):
    """Two configurations alive at once, taking turns: A holds 100 MB and its steps need 50 more
    (leaving 10 behind: optimizer state), B holds 300 and its steps need 20. Alone, A peaks at
    100 + 10 + 50 = 160 and B at 320; one counter for both would say 460 for each."""
    mem = {"now": 0, "peak": 0}

    def alloc(n):
        mem["now"] += n
        mem["peak"] = max(mem["peak"], mem["now"])

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: mem["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: mem.update(peak=mem["now"]))
    a, b = bench.PeakMemory(torch.device("cuda")), bench.PeakMemory(torch.device("cuda"))
    for m, held in ((a, 100), (b, 300)):  # each built (model copy, data on the device)
        m.start()
        alloc(held)
        m.stop()
    steps = {a: (10, 50), b: (0, 20)}  # (left behind, transient)
    for m in (a, b, a, b, a):
        m.start()
        kept, transient = steps[m]
        alloc(kept + transient)
        alloc(-transient)
        steps[a] = (0, 50)  # optimizer state is made once
        m.stop()
    assert (a.peak, b.peak) == (160, 320)


# --------------------------------------------------------------------------- int8 stays on the CPU
def test_int8_is_not_timed_on_gpu_providers(tmp_path, monkeypatch, capsys):
    make_checkpoint(tmp_path / "m.pt", "lenet5", 1, 28)  # synthetic data: calibration images are there
    opened = []

    def fake_session(path, provider, **kwargs):
        opened.append((str(path), provider))
        return None

    class FakeRunner:  # a CUDA session's answer, without a GPU
        def __init__(self, sess, graphs=False):
            pass

        def __call__(self, x):
            return torch.zeros(len(x), 10)

    monkeypatch.setattr(export, "pick_provider", lambda name, device: "cuda")
    monkeypatch.setattr(export, "ort_session", fake_session)
    monkeypatch.setattr(export, "OrtRunner", FakeRunner)
    export.main(export.get_args_parser().parse_args(
        [str(tmp_path / "m.pt"), "--int8", "--calibration", "16", "--benchmark", "--no-compile",
         "--batch-sizes", "2", "--warmup", "0", "--repeats", "1", "--device", "cpu"]))
    assert (tmp_path / "m.int8.onnx").exists() and opened == [(str(tmp_path / "m.onnx"), "cuda")]
    report = json.loads((tmp_path / "m.benchmark.json").read_text())
    assert {r["runtime"] for r in report["results"]} == {"pytorch eager", "onnxruntime cuda"}
    assert "not timed on cuda" in report["int8_note"] and "CPU provider" in report["int8_note"]
    assert "note: int8 not timed on cuda" in capsys.readouterr().out


# --------------------------------------------------------------------------- TensorRT detection
@pytest.fixture
def gpu_without_tensorrt_on_the_loader_path(monkeypatch, tmp_path):
    """A machine with an NVIDIA driver where libnvinfer.so.10 loads only after pip's TensorRT wheel
    (its package tensorrt_libs) was imported, as with tensorrt-cu13-libs 10.x; returns the folder
    to put on sys.path to install that wheel."""
    def cdll(name, *args, **kwargs):
        if name == "libcuda.so.1" or name == predict.TENSORRT and sys.modules.get("tensorrt_libs"):
            return object()
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(predict.ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setitem(sys.modules, "tensorrt_libs", None)  # not installed: import fails
    (tmp_path / "site" / "tensorrt_libs").mkdir(parents=True)
    (tmp_path / "site" / "tensorrt_libs" / "__init__.py").write_text("# loads every library in its folder\n")
    return tmp_path / "site"


def test_auto_says_why_it_skips_tensorrt_and_finds_the_pip_wheel(gpu_without_tensorrt_on_the_loader_path,
                                                                   monkeypatch, capsys):
    assert predict.providers_for("auto") == [CUDA, CPU]
    assert export.pick_provider("auto", torch.device("cuda")) == "cuda"
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 2 and all(n.startswith("note: --provider auto: CUDA, not TensorRT: libnvinfer.so.10 "
                                                "(TensorRT 10) does not load") for n in notes)
    monkeypatch.syspath_prepend(str(gpu_without_tensorrt_on_the_loader_path))  # pip install tensorrt-cu13==10
    monkeypatch.delitem(sys.modules, "tensorrt_libs")
    assert predict.providers_for("auto") == [TRT, CUDA, CPU]
    assert export.pick_provider("auto", torch.device("cuda")) == "tensorrt"
    assert capsys.readouterr().err == ""
    assert export.pick_provider("auto", torch.device("cpu")) == "cpu"


# --------------------------------------------------------------------------- predict.py's TensorRT session
class FakeSession:
    """An InferenceSession that records its providers; the model has a dynamic batch."""

    def __init__(self, path, providers):
        self.providers, self.options = list(providers), None

    def get_inputs(self):
        return [SimpleNamespace(name="input", shape=["batch", 3, 8, 8])]

    def set_providers(self, providers):
        self.providers = [p if isinstance(p, str) else p[0] for p in providers]
        self.options = [p[1] if isinstance(p, tuple) else {} for p in providers]

    def get_providers(self):
        return self.providers

    def get_modelmeta(self):
        meta = {"classes": '["a", "b"]', "mean": "[0, 0, 0]", "std": "[1, 1, 1]", "image_size": "8",
                "in_channels": "3"}
        return SimpleNamespace(custom_metadata_map=meta)

    def get_outputs(self):
        return [SimpleNamespace(name="logits", shape=["batch", 2])]


def test_tensorrt_engine_cache_and_profile(tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "providers_for", lambda name: [TRT, CUDA, CPU])
    monkeypatch.setattr(predict.ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(predict.ort, "preload_dlls", lambda: None, raising=False)
    path = tmp_path / "models" / "best.onnx"
    path.parent.mkdir()
    path.write_bytes(b"model one")
    sess = predict.Model(path, "tensorrt", batch_size=16).sess
    options = sess.options[0]
    assert sess.providers == [TRT, CUDA, CPU]
    assert options["trt_engine_cache_enable"] == "1"
    assert options["trt_engine_cache_path"] == str(tmp_path / "models" / "best.onnx.tensorrt")
    assert (tmp_path / "models" / "best.onnx.tensorrt").is_dir()
    assert options["trt_profile_min_shapes"] == "input:1x3x8x8"  # the last, smaller batch fits the engine
    assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"] == "input:16x3x8x8"
    # onnxruntime's cache key ignores the weights: the file's bytes name the engines
    assert hashlib.sha256(b"model one").hexdigest()[:20] in options["trt_engine_cache_prefix"]
    path.write_bytes(b"model two, re-exported")
    monkeypatch.setattr(predict.os, "access", lambda p, mode: "models" not in str(p))  # a read-only folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    options = predict.Model(path, "tensorrt", batch_size=16).sess.options[0]
    assert hashlib.sha256(b"model two, re-exported").hexdigest()[:20] in options["trt_engine_cache_prefix"]
    assert options["trt_engine_cache_path"].startswith(str(tmp_path / "user-cache"))
