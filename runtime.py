"""What the scripts share at run time: device, AMP, compile and thread choices, hardware names,
timing, memory checks, the range-checked argparse type, the exit-code rule and the atomic writer.

    python runtime.py          # the device auto would pick, its name and vector extensions
"""
import argparse
import errno
import math
import os
import platform
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

if Path(sys.argv[0]).resolve().parent == Path(__file__).resolve().parent:
    # One of this repo's scripts is starting: Ctrl-C while torch imports (seconds) exits 130 with
    # one line, not a traceback; run_cli puts Python's own handler back once the script runs.
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), os._exit(130)))

import torch  # noqa: E402

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The CPU flags (lscpu / /proc/cpuinfo) that decide how fast convolutions and bf16 run here.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                "amx_bf16", "amx_int8", "amx_tile", "neon", "asimd", "sve")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # elsewhere bf16 autocast is emulated (slow)
# torch.compile on the CPU repays its compile time only after this many training steps (resnet20,
# batch 128: a cold compile cost 44.5 s and saved 0.033 s a step; docs/performance.md).
COMPILE_MIN_STEPS_CPU = 1500


def pick_device(name="auto"):
    """'auto': cuda, then mps, then cpu; an explicit device that is not there is a ValueError."""
    there = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(d for d, ok in there.items() if ok))
    if not there[name]:
        raise ValueError(f"--device {name}: no {dict(cuda='CUDA', mps='Apple MPS')[name]} device here")
    return torch.device(name)


def pick_amp(name, device, *, training=False):
    """(autocast dtype or None, why). auto trains in bf16 on a GPU with bf16 in hardware (fp16 on
    older ones and on MPS) and on a CPU with native bf16; elsewhere, and for every evaluation,
    fp32: reported metrics are then exactly those of the fp32 ONNX export."""
    device = torch.device(device)
    if name != "auto":
        return AMP_DTYPES[name], f"--amp {name}"
    if not training:
        return None, "evaluation stays fp32"
    if device.type == "cuda":  # is_bf16_supported() alone says yes through slow emulation on old GPUs
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return (torch.bfloat16, "CUDA GPU with bf16") if bf16 else (torch.float16, "CUDA GPU without bf16")
    if device.type == "mps":
        return torch.float16, "MPS"
    native = [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]
    if not native:
        return None, "CPU without native bf16 (no amx_bf16/avx512_bf16)"
    return torch.bfloat16, f"native bf16 on this CPU: {' '.join(native)}"


def pick_compile(value, device, *, train_steps=None, deterministic=False):
    """(compile or not, why). auto: on CUDA (not with --deterministic: inductor's kernels are not
    covered by torch's deterministic mode); on the CPU for runs of at least COMPILE_MIN_STEPS_CPU
    training steps, where compiling is repaid."""
    device = torch.device(device)
    if value != "auto":
        return value == "on", f"--compile {value}"
    if deterministic:
        return False, "--deterministic"
    if device.type != "cpu":
        return device.type == "cuda", "CUDA" if device.type == "cuda" else f"{device.type}: not measured"
    if (train_steps or 0) >= COMPILE_MIN_STEPS_CPU:
        return True, f"{train_steps} training steps >= {COMPILE_MIN_STEPS_CPU} repay compiling"
    return False, f"{train_steps or 'few'} training steps < {COMPILE_MIN_STEPS_CPU}: not repaid"


def pick_channels_last(value, device):
    """(channels_last or not, why). auto: on CUDA and the CPU (cuDNN's and oneDNN's fast
    convolutions work in NHWC), off elsewhere."""
    kind = torch.device(device).type
    if value != "auto":
        return value == "on", f"--channels-last {value}"
    nhwc = kind in ("cuda", "cpu")
    return nhwc, f"{kind}: NHWC convolutions" if nhwc else f"{kind}: not measured"


def busy_cpus(seconds=0.1):
    """How many CPUs other work kept busy over the last `seconds` (Linux /proc/stat; else None)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait
    try:
        (total0, idle0), _, (total1, idle1) = sample(), time.sleep(seconds), sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0)) if total1 > total0 else None


def free_threads(default, cpus, busy):
    """Intra-op threads that fit beside `busy` CPUs of other work: at most `default`, at least 1."""
    return max(1, min(default, int(cpus - busy + 0.5)))


def pick_threads(value, device):
    """(intra-op threads, why). auto: torch's default less the CPUs busy elsewhere (a step with more
    threads than free cores waits at every operator for its slowest, descheduled thread); not the
    default, as the thread count changes the order of float sums."""
    default = torch.get_num_threads()
    if torch.device(device).type != "cpu":
        return default, "not the CPU: unchanged"
    if value is None:
        cpus, load = os.cpu_count() or 1, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        hint = (f"; load average {load:.1f} on {cpus} CPUs: --threads auto may be faster"
                if default > 1 and load > cpus - default + 0.5 else "")
        return default, "torch's default" + hint
    if value != "auto":
        return int(value), f"--threads {value}"
    busy = busy_cpus()
    cpus = os.cpu_count() or 1
    if busy is None:
        return default, "torch's default (no /proc/stat to see other work)"
    return free_threads(default, cpus, busy), f"{default} by default, {busy:.1f} of {cpus} CPUs busy"


def pick_speed(device, *, amp="auto", compile="auto", channels_last="auto", threads=None,
               train_steps=None, deterministic=False):
    """Every speed choice of a run: amp, eval_amp (autocast dtypes or None), compile, channels_last,
    threads, and why (one reason each)."""
    amp_dtype, amp_why = pick_amp(amp, device, training=True)
    use_compile, compile_why = pick_compile(compile, device, train_steps=train_steps,
                                            deterministic=deterministic)
    cl, cl_why = pick_channels_last(channels_last, device)
    n, threads_why = pick_threads(threads, device)
    return {"amp": amp_dtype, "eval_amp": pick_amp(amp, device)[0], "compile": use_compile,
            "channels_last": cl, "threads": n,
            "why": {"amp": amp_why, "compile": compile_why, "channels_last": cl_why, "threads": threads_why}}


def dtype_name(dtype):
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def describe_speed(speed):
    """One line for a run header: each choice and why."""
    w, amp = speed["why"], dtype_name(speed["amp"])
    if speed["eval_amp"] != speed["amp"]:
        amp += f", evaluation {dtype_name(speed['eval_amp'])}"
    return (f"amp {amp} ({w['amp']}), channels_last {'on' if speed['channels_last'] else 'off'} "
            f"({w['channels_last']}), compile {'on' if speed['compile'] else 'off'} ({w['compile']}), "
            f"threads {speed['threads']} ({w['threads']})")


def start(device, *, seed=0, deterministic=False):
    """(rank, world, device) of a training process: the process group under torchrun (NCCL on CUDA,
    gloo on the CPU; even with one process), the seed, and the kernels' determinism (TF32 off and
    cuBLAS's fixed workspace under --deterministic)."""
    device, rank, world = pick_device(device), 0, 1
    if "RANK" in os.environ:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if deterministic:  # before cuBLAS's first call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic
    return rank, world, device


def cudagraph_note(mode, world, model):
    """reduce-overhead promises CUDA graphs, which inductor skips under DDP for a model with
    BatchNorm (its running statistics are mutated inputs): say so instead."""
    if mode == "reduce-overhead" and world > 1 and any(isinstance(m, torch.nn.BatchNorm2d)
                                                       for m in model.modules()):
        return ("note: --compile-mode reduce-overhead under DDP skips CUDA graphs for this model (BatchNorm's"
                " running statistics are mutated inputs): it runs compiled, without graphs")
    return None


def _cpuinfo(keys):
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith(keys)), None)
    except OSError:
        return None


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "CPU"


def cpu_flags():
    """The vector extensions of VECTOR_FLAGS this CPU reports (Linux /proc/cpuinfo; else [])."""
    flags = (_cpuinfo(("flags", "Features")) or "").split()
    return [f for f in VECTOR_FLAGS if f in flags]


def cpu_count():
    """CPUs this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
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
    kind = torch.device(device).type
    if kind in ("cuda", "mps"):
        getattr(torch, kind).synchronize()


def time_calls(fn, *, device="cpu", warmup=1, repeats=10, max_seconds=None):
    """Seconds per call of fn() after `warmup` calls: up to `repeats` (at least one within
    max_seconds), the device synchronized before each clock read (asynchronous GPU work counts)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times, end = [], time.perf_counter() + (max_seconds or math.inf)
    while len(times) < repeats and (not times or time.perf_counter() < end):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def median_p90(times):
    """(median, p90) of a list of seconds."""
    s = sorted(times)
    return statistics.median(s), s[min(len(s) - 1, max(0, -(-9 * len(s) // 10) - 1))]


def memory_available(device):
    """Bytes an allocation can take now (CUDA: free plus torch's unused cache); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def forward_bytes(model, input_shape):
    """Estimated peak bytes of one float32 inference forward per image (C x H x W): the input plus
    three times the largest output of a leaf module (a block's input, output and one branch are
    alive at once), from a pass on the meta device (no memory, no compute)."""
    largest = [0]

    def hook(module, inputs, out):
        largest[0] = max([largest[0]] + [t[0].numel() for t in (out if isinstance(out, tuple) else (out,))])
    hooks = [m.register_forward_hook(hook) for m in model.modules() if not any(m.children())]
    was_training = model.training
    try:
        state = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
        with torch.no_grad():
            torch.func.functional_call(model.eval(), state, (torch.empty(1, *input_shape, device="meta"),))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return 4 * (math.prod(input_shape) + 3 * largest[0])


def ensure_fits(nbytes, device, what, hint):
    """ValueError (one line) when `nbytes` exceed the memory available on `device`, before the
    allocation: on Linux a too large CPU allocation may not fail but summon the OOM killer."""
    free = memory_available(device)
    if free is not None and nbytes > free:
        raise ValueError(f"{what} needs about {nbytes / 2**30:.3g} GiB, more than the {free / 2**30:.3g} GiB "
                         f"of {torch.device(device).type} memory available: {hint}")


def is_out_of_memory(e):
    """MemoryError, torch.OutOfMemoryError, or an allocator's RuntimeError (also from a worker)."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("not enough memory", "allocate memory", "out of memory"))


def number(kind, lo=None, hi=None, *, lo_open=False, hi_open=False, what=""):
    """An argparse type: a finite int or float in the range (either end open where None); else
    exit 2 with a usage line naming the flag and the range ("argument --ema: must be in [0, 1),
    got 2"). `what` says in a word what the range means."""
    f = str if kind is int else "{:g}".format
    allowed = (f"in {'(' if lo_open else '['}{f(lo)}, {f(hi)}{')' if hi_open else ']'}"
               if None not in (lo, hi) else f"{'>' if lo_open else '>='} {f(lo)}" if lo is not None
               else f"{'<' if hi_open else '<='} {f(hi)}" if hi is not None else "finite")
    allowed += f" ({what})" if what else ""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'} {allowed}, got {text!r}") from None
        if (not math.isfinite(v) or lo is not None and (v < lo or lo_open and v == lo)
                or hi is not None and (v > hi or hi_open and v == hi)):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


def one_line(e, limit=300):
    """An exception's (or any text's) message on one line, at most `limit` characters."""
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= limit else s[:limit] + "..."


def run_cli(main, parser, argv=None, oom_hint="lower --batch-size (or --image-size)"):
    """Every script's exit-code rule: parse argv with the parser (or a parse function; sys.argv
    when None; bad usage exits 2 from argparse), run main(args) and return main's int or 0; 1 with
    one `error:` line for what a user can fix (ValueError, OSError, running out of memory); 130 on
    Ctrl-C, printing the interrupt's own message (e.g. how to resume) or "interrupted"."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc = main(getattr(parser, "parse_args", parser)(argv))
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {one_line(e, 2000)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise  # a bug, not a user's mistake: keep its traceback
        print(f"error: out of memory: {oom_hint}", file=sys.stderr)
        return 1
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


def _no_space(e):
    """A full disk or quota, however it was wrapped (torch's writer says 'file write failed')."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        if "No space left" in str(e) or "file write failed" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextmanager
def replacing(path):
    """The one way files are written here: yields a temp path beside `path` (same suffix) to write,
    renamed over `path` when the block succeeds. On any failure (Ctrl-C included) the temp file is
    removed and the previous file at `path` stays as it was; a full disk is one OSError line."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if _no_space(e):
            raise OSError(errno.ENOSPC, f"no space left on the disk of {path.parent.resolve()} while "
                          f"writing {path.name} (the previous {path.name}, if any, is kept)") from None
        raise


def write_text(path, text):
    """Write a text file atomically (replacing)."""
    with replacing(path) as tmp:
        tmp.write_text(text)


if __name__ == "__main__":
    d = pick_device("auto")
    print(f"device {d}: {device_name(d)}; CPU {cpu_name()}, {cpu_count()} CPUs, "
          f"vector extensions: {' '.join(cpu_flags()) or 'unknown'}; torch {torch.__version__}")
