"""Runtime helpers shared by train.py, evaluate.py, export.py and bench.py: which device, which
AMP dtype, what the hardware is called, how to time a call, whether a batch fits in memory, and
the argparse types that check a number's range at parse time.

    python runtime.py          # prints the device auto would pick, its name and vector extensions
"""
import argparse
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager

import torch

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The CPU flags (lscpu / /proc/cpuinfo) that decide how fast convolutions and bf16 run here.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                "amx_bf16", "amx_int8", "amx_tile", "neon", "asimd", "sve")
# A CPU with one of these computes bf16 in hardware; elsewhere bf16 autocast is emulated (slow).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# torch.compile on the CPU pays back its compile time only after this many training steps; shorter
# runs stay eager. Measured for resnet20 at batch 128 on the 2-core Xeon (README, "Training speed on
# a CPU"; results/cpu/compile_cold_resnet20.json): a cold compile costs 44.5 s and saves 0.033 s a
# step (837 -> 1,070 images/s), so it is repaid after ~1,340 steps.
COMPILE_MIN_STEPS_CPU = 1500


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


def pick_amp(name, device, *, training=False):
    """The autocast dtype (None: fp32); see amp_choice."""
    return amp_choice(name, device, training=training)[0]


def amp_choice(name, device, *, training=False):
    """(autocast dtype or None, why). auto: bf16 on a CUDA GPU that has it in hardware (Ampere
    and later; is_bf16_supported() alone says yes on older GPUs through slow emulation), fp16
    there otherwise; fp16 on MPS; on the CPU bf16 for training where the CPU computes bf16
    natively (NATIVE_BF16_FLAGS: AMX or AVX512-BF16; measured for accuracy in the README), fp32
    elsewhere and for evaluation."""
    device = torch.device(device)
    if name != "auto":
        return AMP_DTYPES[name], f"--amp {name}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "CUDA GPU with bf16"
        return torch.float16, "CUDA GPU without bf16"
    if device.type == "mps":
        return torch.float16, "MPS"
    native = [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]
    if not native:
        return None, "CPU without native bf16 (no amx_bf16/avx512_bf16)"
    if not training:
        return None, "evaluation stays fp32"
    return torch.bfloat16, f"native bf16 on this CPU: {' '.join(native)}"


def _switch(value):
    """'auto' | 'on' | 'off' from a flag value; True/False from checkpoints written before the
    flags took a value."""
    if value is True or value is False or value is None:
        return "on" if value else "off"
    return value


def pick_compile(value, device, *, train_steps=None):
    """(compile or not, why). auto: on CUDA; on the CPU for runs of at least
    COMPILE_MIN_STEPS_CPU training steps, where compiling is repaid; off elsewhere."""
    value, device = _switch(value), torch.device(device)
    if value != "auto":
        return value == "on", f"--compile {value}"
    if device.type == "cuda":
        return True, "CUDA"
    if device.type == "cpu":
        if train_steps is not None and train_steps >= COMPILE_MIN_STEPS_CPU:
            return True, f"{train_steps} training steps >= {COMPILE_MIN_STEPS_CPU} repay compiling"
        return False, (f"{train_steps if train_steps is not None else 'few'} training steps < "
                       f"{COMPILE_MIN_STEPS_CPU}: compiling would not be repaid")
    return False, f"{device.type}: not measured"


def pick_channels_last(value, device):
    """(channels_last or not, why). auto: on CUDA and on the CPU (oneDNN's and cuDNN's fast
    convolutions work in NHWC), off elsewhere."""
    value, device = _switch(value), torch.device(device)
    if value != "auto":
        return value == "on", f"--channels-last {value}"
    if device.type in ("cuda", "cpu"):
        return True, f"{device.type}: NHWC convolutions"
    return False, f"{device.type}: not measured"


def busy_cpus(seconds=0.1):
    """How many of this machine's CPUs other work kept busy over the last `seconds` (Linux
    /proc/stat; None elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def free_threads(default, cpus, busy):
    """Intra-op threads that fit beside `busy` CPUs of other work on `cpus` CPUs: at most
    `default`, at least 1."""
    return max(1, min(default, int(cpus - busy + 0.5)))


def pick_threads(value, device):
    """(intra-op threads, why) for the CPU. None: torch's default (the physical cores). auto:
    that less the CPUs other processes keep busy as the run starts, at least 1: on a shared CPU
    a step with more threads than free cores waits at every operator for its slowest,
    descheduled thread (measured in the README's CPU speed section). Not the default because
    the thread count changes the order of float sums: runs started under different load would
    not repeat bit for bit."""
    device = torch.device(device)
    default = torch.get_num_threads()
    if device.type != "cpu":
        return default, f"{device.type}: unchanged"
    if value is None:
        cpus, load = os.cpu_count() or 1, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        hint = (f"; load average {load:.1f} on {cpus} CPUs: --threads auto may be faster"
                if default > 1 and load > cpus - default + 0.5 else "")
        return default, "torch's default" + hint
    if value != "auto":
        return int(value), f"--threads {value}"
    busy = busy_cpus()
    if busy is None:
        return default, "torch's default (no /proc/stat to see other work)"
    cpus = os.cpu_count() or 1
    return free_threads(default, cpus, busy), f"{default} by default, {busy:.1f} of {cpus} CPUs busy with other work"


def pick_speed(device, *, amp="auto", compile="auto", channels_last="auto", threads=None,
               train_steps=None):
    """Every speed choice of a training run in one place: a dict with amp (autocast dtype of the
    training steps, or None), eval_amp (of the per-epoch evaluation: with auto on the CPU fp32,
    so the run's test metrics are evaluate.py's), compile, channels_last, threads and why (one
    reason per choice)."""
    amp_dtype, amp_why = amp_choice(amp, device, training=True)
    eval_amp = pick_amp(amp, device)
    use_compile, compile_why = pick_compile(compile, device, train_steps=train_steps)
    cl, cl_why = pick_channels_last(channels_last, device)
    n, threads_why = pick_threads(threads, device)
    return {"amp": amp_dtype, "eval_amp": eval_amp, "compile": use_compile, "channels_last": cl, "threads": n,
            "why": {"amp": amp_why, "compile": compile_why, "channels_last": cl_why, "threads": threads_why}}


def describe_speed(speed):
    """One line for a run header: each choice and why."""
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    amp, w = name[speed["amp"]], speed["why"]
    if speed.get("eval_amp", speed["amp"]) != speed["amp"]:
        amp += f", evaluation {name[speed['eval_amp']]}"
    return (f"amp {amp} ({w['amp']}), channels_last {'on' if speed['channels_last'] else 'off'} "
            f"({w['channels_last']}), compile {'on' if speed['compile'] else 'off'} ({w['compile']}), "
            f"threads {speed['threads']} ({w['threads']})")


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


# ----------------------------------------------------------------------------- memory

def memory_available(device):
    """Bytes a new allocation can take on `device` now: the free GPU memory plus what torch's
    cache holds unused on CUDA, MemAvailable of /proc/meminfo on the CPU; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None
    return None


def forward_bytes(model, input_shape):
    """Estimated peak bytes of one float32 inference forward per image (C x H x W): the input plus
    three times the largest output of a leaf module (a block's input, its output and one branch
    are alive at once). Shapes come from a pass on the meta device: no memory, no compute."""
    largest = [0]

    def hook(module, inputs, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t):
                largest[0] = max(largest[0], t[0].numel())

    leaves = [m for m in model.modules() if not any(m.children())]
    hooks = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        state = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
        with torch.no_grad():
            torch.func.functional_call(model, state, (torch.empty(1, *input_shape, device="meta"),))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return 4 * (math.prod(input_shape) + 3 * largest[0])


def _gb(n):
    return f"{n / 2 ** 30:.3g} GiB"


def ensure_fits(nbytes, device, what, hint):
    """ValueError (one line) when `nbytes` exceed the memory available on `device` (when known),
    before the allocation: on Linux a too large CPU allocation may not fail but summon the OOM
    killer, which ends the process (or another one) without a word."""
    free = memory_available(device)
    if free is not None and nbytes > free:
        raise ValueError(f"{what} needs about {_gb(nbytes)}, more than the {_gb(free)} of "
                         f"{torch.device(device).type} memory available: {hint}")


def is_out_of_memory(e):
    """MemoryError, torch.OutOfMemoryError, or an allocator RuntimeError (CPU: "DefaultCPUAllocator:
    not enough memory" / "can't allocate memory"), also one raised in a DataLoader worker."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "not enough memory", "can't allocate memory", "out of memory", "Cannot allocate memory"))


@contextmanager
def out_of_memory_as_error(hint):
    """Turn an out-of-memory error raised inside into a one-line ValueError ending in `hint`."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        first = next((ln.strip() for ln in str(e).splitlines() if "memory" in ln), type(e).__name__)
        raise ValueError(f"out of memory ({first[:200]}): {hint}") from None


# ----------------------------------------------------------------------------- argparse types

def int_range(lo=None, hi=None):
    """An argparse type: an int in [lo, hi] (either end open when None); the error names the range."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: {_range(lo, hi, True, True)}")
        return v
    parse.__name__ = "int"
    return parse


def float_range(lo=None, hi=None, *, lo_open=False, hi_open=False):
    """An argparse type: a finite float in the range; lo_open / hi_open exclude the ends."""
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} is not finite: {_range(lo, hi, not lo_open, not hi_open)}")
        if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and (v > hi or (hi_open and v == hi)):
            raise argparse.ArgumentTypeError(f"{v:g} is out of range: {_range(lo, hi, not lo_open, not hi_open)}")
        return v
    parse.__name__ = "float"
    return parse


def _range(lo, hi, lo_closed, hi_closed):
    if lo is not None and hi is not None:
        return f"must be in {'[' if lo_closed else '('}{lo:g}, {hi:g}{']' if hi_closed else ')'}"
    if lo is not None:
        return f"must be {'>=' if lo_closed else '>'} {lo:g}"
    if hi is not None:
        return f"must be {'<=' if hi_closed else '<'} {hi:g}"
    return "must be a finite number"


def run_cli(main, parser, argv=None, errors=(ValueError, OSError)):
    """A script's command line, in-process or not: parse argv (sys.argv when None), run
    main(args); returns the exit status: main's own int, else 0; 1 with one `error:` line for
    `errors` (what a user can fix); 130 on Ctrl-C. Bad usage exits 2 from argparse itself."""
    args = parser.parse_args(argv)
    try:
        rc = main(args)
    except errors as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


if __name__ == "__main__":
    d = pick_device("auto")
    print(f"device {d}: {device_name(d)}; CPU {cpu_name()}, {cpu_count()} CPUs, "
          f"vector extensions: {' '.join(cpu_flags()) or 'unknown'}; torch {torch.__version__}")
