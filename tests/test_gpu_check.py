"""gpu_check.sh on a machine without a GPU: its CPU parts run, every GPU part is skipped with the
reason, and a failing part is recorded without hiding the others (the script's exit status 1)."""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO

GPU_PARTS = {"train_bf16", "evaluate", "export_cuda", "predict_cuda", "export_tensorrt", "aoti_cuda",
             "train_fp16", "torchrun_nccl", "classic"}
CPU_PARTS = {"machine", "data", "train_cpu", "int8"}
CLASSES, TRAIN, TEST = ("ant", "bee", "cat"), 6, 3

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs its GPU parts")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder of 32 x 32 images: a colour per class, with noise; JPEG and PNG files."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", TRAIN), ("test", TEST)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                x = torch.randint(0, 80, (32, 32, 3), generator=g, dtype=torch.uint8)
                x[..., c] += 150
                Image.fromarray(x.numpy()).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def gpu_check(tmp_path, python, *args):
    """Run the script with the tiny settings -> (exit status, the JSON's parts by name, the JSON).
    python: its PYTHON (fork_python saves a torch import per train.py / export.py run)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(python), "GPU_CHECK_WORK": str(tmp_path / "work")}
    p = subprocess.run(["bash", str(REPO / "gpu_check.sh"), "--out", str(out), "--model", "lenet5",
                        "--int8-max-drop", "100", *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=300)
    doc = json.loads((out / "gpu_check.json").read_text())
    parts = {p["name"]: p for p in doc["parts"]}
    assert len(parts) == len(doc["parts"]) and set(parts) == GPU_PARTS | CPU_PARTS, p.stdout + p.stderr
    for name, part in parts.items():  # every part: a status, a reason unless it passed, its log
        assert part["status"] in ("passed", "failed", "skipped")
        assert (part["reason"] is None) == (part["status"] == "passed"), part
        assert part["seconds"] >= 0 and (out / part["log"]).is_file(), part
    for name in GPU_PARTS:
        assert parts[name]["status"] == "skipped", parts[name]
        assert parts[name]["reason"] == "no CUDA device: torch.cuda.is_available() is False"
    return p.returncode, parts, doc


def test_cpu_parts_pass_and_gpu_parts_are_skipped(tmp_path, folder, fork_python):
    rc, parts, doc = gpu_check(tmp_path, fork_python, "--data-dir", folder)
    assert rc == 0, json.dumps(parts, indent=1)
    assert {n for n, p in parts.items() if p["status"] == "passed"} == CPU_PARTS
    m = doc["machine"]
    assert m["gpu"] is None and m["torch"] == torch.__version__ and m["python"] == platform.python_version()
    for key in ("driver", "torch_cuda", "cudnn", "torchvision", "onnxruntime", "ort_providers", "cpu"):
        assert key in m
    d = parts["data"]["figures"]
    n = len(CLASSES)
    assert (d["train_images"], d["test_images"], d["classes"]) == (n * TRAIN, n * TEST, n)
    assert d["image_size"] == 32
    t = parts["train_cpu"]["figures"]
    assert t["epochs"] == 1 and t["images_per_second_epoch1"] > 0 and 0 <= t["test_top1"] <= 1
    assert t["images_per_second_steady"] is None and t["peak_gpu_memory_gib"] is None  # one epoch, no GPU
    q = parts["int8"]["figures"]
    assert 0 <= q["top1_int8"] <= 1 and 0 <= q["int8_fp32_agreement"] <= 1
    assert any(line.startswith("check onnx real") and line.endswith("ok") for line in q["checks"])
    rows = q["benchmark"]["results"]
    assert {r["runtime"] for r in rows} >= {"pytorch eager", "onnxruntime cpu", "onnxruntime cpu int8"}
    assert {r["batch"] for r in rows} == {1, 64} and all(r["median_ms"] > 0 for r in rows)


def test_a_failing_part_is_recorded_and_the_rest_still_run_or_skip(tmp_path):
    rc, parts, _ = gpu_check(tmp_path, sys.executable, "--data-dir", tmp_path / "missing")
    assert rc == 1
    assert parts["machine"]["status"] == "passed"
    assert parts["data"]["status"] == "failed" and str(tmp_path / "missing") in parts["data"]["reason"]
    assert parts["train_cpu"]["status"] == "skipped" and "(data: failed)" in parts["train_cpu"]["reason"]
    assert parts["int8"]["status"] == "skipped" and "(train_cpu: skipped)" in parts["int8"]["reason"]
