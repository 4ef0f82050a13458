"""Runtime helpers shared by train.py, evaluate.py, export.py and bench.py: which device, which
AMP dtype, what the hardware is called, and how to time a call.

    python runtime.py          # prints the device auto would pick, its name and vector extensions
"""
import os
import platform
import statistics
import time

import torch

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The CPU flags (lscpu / /proc/cpuinfo) that decide how fast convolutions and bf16 run here.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                "amx_bf16", "amx_int8", "amx_tile", "neon", "asimd", "sve")


def mps_available():
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(name="auto"):
    """'auto': cuda, then mps (Apple silicon), then cpu. An explicit device that is not there is a
    ValueError (one line)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name == "mps" and not mps_available():
        raise ValueError("--device mps: no Apple MPS device is available")
    return torch.device(name)


def pick_amp(name, device):
    """The autocast dtype (None: fp32). auto: bf16 on a CUDA GPU that has it in hardware (Ampere
    and later; is_bf16_supported() alone says yes on older GPUs through slow emulation), fp16
    there otherwise; fp16 on MPS; off on the CPU."""
    device = torch.device(device)
    if name != "auto":
        return AMP_DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    name = platform.processor() or platform.machine() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return name


def cpu_flags():
    """The vector extensions of VECTOR_FLAGS this CPU reports (Linux /proc/cpuinfo; else [])."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith(("flags", "Features"))), [])
    except OSError:
        return []
    return [f for f in VECTOR_FLAGS if f in flags]


def cpu_count():
    """CPUs this process may run on: sched_getaffinity where the OS has it (Linux), else os.cpu_count()."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return len(getaffinity(0))
        except OSError:
            pass
    return os.cpu_count() or 1


def device_name(device):
    """GPU name, or CPU model plus torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def synchronize(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_calls(fn, *, device="cpu", warmup=1, repeats=10, max_seconds=None):
    """Seconds per call of fn(): `warmup` untimed calls, then up to `repeats` timed ones (stopping
    early, after at least one, once max_seconds have passed), the device synchronized before every
    clock read so asynchronous GPU work is counted."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times, start = [], time.perf_counter()
    while len(times) < repeats and (max_seconds is None or not times or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def median_p90(times):
    """(median, p90) of a list of seconds."""
    s = sorted(times)
    return statistics.median(s), s[min(len(s) - 1, max(0, -(-9 * len(s) // 10) - 1))]


if __name__ == "__main__":
    d = pick_device("auto")
    print(f"device {d}: {device_name(d)}; CPU {cpu_name()}, {cpu_count()} CPUs, "
          f"vector extensions: {' '.join(cpu_flags()) or 'unknown'}; torch {torch.__version__}")
