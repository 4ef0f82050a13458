"""The CPU speed choices: each fast path trains like plain eager fp32, and `auto` follows its rule."""
import json

import pytest
import torch
import torch.nn as nn

import models
import runtime
import train

STEPS = 4


def loss_curve(model_name, image_size, *, channels_last=False, amp_dtype=None, compile=False):
    """Per-step training losses through train.py's own train_one_epoch: the same initial weights
    and the same batches for every configuration."""
    torch.manual_seed(0)
    model = models.build_model(model_name, 10, 3, image_size)
    g = torch.Generator().manual_seed(1)
    templates = torch.randn(10, 3, image_size, image_size, generator=g)  # one pattern per class
    batches = []
    for _ in range(STEPS):
        y = torch.randint(0, 10, (32,), generator=g)
        batches.append((templates[y] + 0.5 * torch.randn(32, 3, image_size, image_size, generator=g), y))
    mem = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=mem)
    batches = [(x.contiguous(memory_format=mem), y) for x, y in batches]
    net = torch.compile(model) if compile else model
    cpu = torch.device("cpu")
    optimizer = train.build_optimizer(model, cpu, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = train.Schedule(optimizer, "none", 1, 1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for batch in batches:  # one step per call: its mean loss is that step's loss
        loss, _, _ = train.train_one_epoch(net, [batch], optimizer, schedule, scaler,
                                           nn.CrossEntropyLoss(), epoch=0, device=cpu,
                                           amp_dtype=amp_dtype)
        losses.append(loss)
    return losses


@pytest.mark.parametrize("config, tol", [("channels_last", 1e-3), ("bf16", 1e-2)])
def test_fast_paths_follow_the_eager_loss_curve(config, tol):
    # resnet20 (BatchNorm, shortcuts) at 16 px: NHWC convolutions and bf16 autocast change the
    # arithmetic, not the training; bf16 (8-bit mantissa) gets the looser tolerance.
    ref = loss_curve("resnet20", 16)
    got = loss_curve("resnet20", 16, channels_last=config == "channels_last",
                     amp_dtype=torch.bfloat16 if config == "bf16" else None)
    assert ref[-1] < ref[0]  # it trains: a curve worth comparing
    assert got == pytest.approx(ref, rel=tol)


def test_compiled_path_follows_the_eager_loss_curve():
    # lenet5 keeps the compile cheap (seconds, where a ResNet takes a minute on 2 cores).
    ref = loss_curve("lenet5", 16)
    got = loss_curve("lenet5", 16, compile=True)
    assert ref[-1] < ref[0]
    assert got == pytest.approx(ref, rel=1e-3)


# --------------------------------------------------------------------------- the rules of auto

def test_compile_auto_only_where_it_is_repaid():
    n = runtime.COMPILE_MIN_STEPS_CPU
    assert runtime.pick_compile("auto", "cpu", train_steps=n - 1)[0] is False
    assert runtime.pick_compile("auto", "cpu", train_steps=n)[0] is True
    assert runtime.pick_compile("auto", "cpu")[0] is False  # run length unknown: stay eager
    assert runtime.pick_compile("auto", "cuda", train_steps=1)[0] is True
    assert runtime.pick_compile("auto", "mps", train_steps=10 * n)[0] is False
    assert runtime.pick_compile("on", "cpu", train_steps=1)[0] is True
    assert runtime.pick_compile("off", "cuda", train_steps=10 * n)[0] is False
    # inductor's kernels are not covered by torch's deterministic mode: auto stays eager (issue 25, 9)
    assert runtime.pick_compile("auto", "cuda", train_steps=1, deterministic=True)[0] is False
    assert runtime.pick_compile("on", "cuda", deterministic=True)[0] is True


def test_channels_last_auto():
    assert runtime.pick_channels_last("auto", "cpu")[0] is True
    assert runtime.pick_channels_last("auto", "cuda")[0] is True
    assert runtime.pick_channels_last("auto", "mps")[0] is False
    assert runtime.pick_channels_last("off", "cpu")[0] is False
    assert runtime.pick_channels_last("on", "mps")[0] is True


def test_amp_auto_on_cpu_needs_native_bf16(monkeypatch):
    def amp(*a, **kw):
        return runtime.pick_amp(*a, **kw)[0]
    monkeypatch.setattr(runtime, "cpu_flags", lambda: ["avx2", "fma"])  # e.g. an AVX2-only EPYC
    assert amp("auto", "cpu", training=True) is None
    monkeypatch.setattr(runtime, "cpu_flags", lambda: ["avx2", "avx512f", "avx512_bf16"])
    assert amp("auto", "cpu", training=True) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_flags", lambda: ["amx_bf16"])
    assert amp("auto", "cpu", training=True) is torch.bfloat16
    assert amp("off", "cpu", training=True) is None
    assert amp("fp16", "cpu", training=True) is torch.float16
    # every evaluation is fp32 under auto, on every device: reported metrics equal the fp32 ONNX export's
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: True)
    assert [amp("auto", d) for d in ("cpu", "cuda", "mps")] == [None] * 3
    assert (amp("auto", "cuda", training=True), amp("auto", "mps", training=True)) == (torch.bfloat16, torch.float16)


def test_threads_auto_leaves_busy_cpus_alone():
    assert runtime.free_threads(2, cpus=2, busy=0.1) == 2  # a quiet 2-core machine
    assert runtime.free_threads(2, cpus=2, busy=1.7) == 1  # one core taken by another job
    assert runtime.free_threads(2, cpus=2, busy=2.0) == 1  # never fewer than 1
    assert runtime.free_threads(4, cpus=8, busy=5.2) == 3
    assert runtime.free_threads(2, cpus=8, busy=0.0) == 2  # never more than torch's default
    assert runtime.pick_threads(3, "cpu")[0] == 3
    assert runtime.pick_threads("auto", "cuda")[0] == torch.get_num_threads()


def test_busy_cpus_sees_a_busy_thread():
    import threading
    import time
    stop = time.perf_counter() + 0.6
    spin = threading.Thread(target=lambda: [None for _ in iter(lambda: time.perf_counter() > stop, True)])
    spin.start()
    try:
        busy = runtime.busy_cpus(0.3)
    finally:
        spin.join()
    if busy is None:
        pytest.skip("no /proc/stat here")
    assert busy >= 0.5  # the spinning thread (other work, as far as a new run can tell)


# --------------------------------------------------------------------------- the CLI

def test_bare_flags_mean_on_and_bad_values_exit_2():
    p = train.get_args_parser()
    a = train.parse_args(["--model", "lenet5", "--dataset", "synthetic", "--compile", "--channels-last"])
    assert (a.compile, a.channels_last, a.amp, a.threads) == ("on", "on", "auto", None)
    a = p.parse_args(["--compile", "off", "--channels-last", "auto", "--threads", "3"])
    assert p.parse_args(["--threads", "auto"]).threads == "auto"
    assert (a.compile, a.channels_last, a.threads) == ("off", "auto", 3)
    for bad in (["--threads", "0"], ["--threads", "x"], ["--compile", "yes"], ["--channels-last", "1"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(bad)
        assert e.value.code == 2


def test_run_header_and_config_record_the_choices(tmp_path, capsys):
    out = tmp_path / "run"
    args = train.parse_args(
        ["--model", "lenet5", "--dataset", "synthetic", "--limit-train", "64", "--limit-test", "32",
         "--batch-size", "32", "--epochs", "1", "--threads", "1", "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        train.main(args)
    finally:
        torch.set_num_threads(threads)
    speed = json.loads((out / "config.json").read_text())["speed"]
    native = any(f in runtime.cpu_flags() for f in ("amx_bf16", "avx512_bf16"))
    assert speed["amp"] == ("torch.bfloat16" if native else "None")
    assert speed["channels_last"] is True and speed["compile"] is False and speed["threads"] == 1
    assert "2 training steps" in speed["why"]["compile"]  # 64 images / 32 per step, one epoch
    header = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("speed: "))
    assert "compile off (2 training steps" in header and "threads 1 (--threads 1)" in header
