import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# pytest.ini runs the suite in parallel (pytest-xdist, one test process per CPU). The processes
# share the cores: each, and every process it starts, gets its share of intra-op threads (more
# would oversubscribe them, and then every operator waits for a descheduled thread).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:
    _SHARE = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ["OMP_NUM_THREADS"] = _SHARE
    import torch
    torch.set_num_threads(int(_SHARE))


def run_script(script, *args, cwd=None, timeout=600, env=None, fresh=False):
    """Run one of the repo's scripts as a user would: (return code, stdout, stderr) as a
    CompletedProcess. In-process by default, through the script's own cli() (what its
    `__main__` runs), which saves starting a Python with torch per call; fresh=True starts a
    real interpreter (exit codes of the process itself, signals, import-time behaviour)."""
    argv = [str(a) for a in args]
    if fresh:
        return subprocess.run([sys.executable, str(REPO / script), *argv], cwd=cwd or REPO,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    return run_in_process(script, argv, cwd=cwd, env=env)


def _module(script):
    name = Path(script).stem
    if "/" not in str(script):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _process_state(cwd, env):
    """What a script may change in the process, put back afterwards: working directory,
    environment, argv, torch's thread count, RNG and determinism switch, warning filters."""
    import torch
    saved = (os.getcwd(), dict(os.environ), list(sys.argv), torch.get_num_threads(),
             torch.get_rng_state(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        os.chdir(cwd or REPO)
        os.environ.update(env or {})
        with warnings.catch_warnings():  # a warning shown once in this process shows again
            warnings.resetwarnings()
            yield
    finally:
        os.chdir(saved[0])
        os.environ.clear()
        os.environ.update(saved[1])
        sys.argv[:] = saved[2]
        torch.set_num_threads(saved[3])
        torch.set_rng_state(saved[4])
        torch.use_deterministic_algorithms(saved[5], warn_only=saved[6])
        torch._dynamo.reset()


def run_in_process(script, argv, cwd=None, env=None):
    module = _module(script)
    out, err = io.StringIO(), io.StringIO()
    with _process_state(cwd, env):
        sys.argv[:] = [str(REPO / script), *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = module.cli(argv)
            except SystemExit as e:  # argparse: 2 on bad usage, 0 for --help
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess([script, *argv], rc, out.getvalue(), err.getvalue())


@pytest.fixture
def run():
    return run_script


@pytest.fixture(scope="session")
def fork_python(tmp_path_factory):
    """An executable to give shell scripts as PYTHON: it runs `PYTHON SCRIPT.py ARGS` as a fork
    of one process that imported torch once (tests/forkserver.py), so each run skips the seconds
    of interpreter start-up; anything else goes to the real interpreter."""
    import socket
    import tempfile
    if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):  # Windows: the real interpreter
        yield Path(sys.executable)
        return
    import forkserver
    folder = tmp_path_factory.mktemp("fork")
    # a socket path must stay under ~100 bytes: a short folder of its own, not pytest's
    sock = Path(tempfile.mkdtemp(prefix="fork-", dir="/tmp" if os.path.isdir("/tmp") else None)) / "s"
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "forkserver.py"), str(sock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        client = folder / "python"
        forkserver.write_client(client, sock)
        yield client
    finally:
        server.terminate()
        server.wait(timeout=30)
        with contextlib.suppress(OSError):
            sock.unlink()
            sock.parent.rmdir()
