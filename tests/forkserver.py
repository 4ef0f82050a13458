"""A test-only launcher that starts the repo's scripts without paying for `import torch` each time.

The study tests run studies/*.sh, which start `$PYTHON train.py ...` and `$PYTHON evaluate.py ...`
as separate processes, a dozen per test. Each new Python spends seconds importing torch,
torchvision and matplotlib before doing a few milliseconds of training on tiny data. Here one
server process imports them once (and runs no torch operation, so forking it is safe); each
script run is a fork of it that executes the script as `__main__` with the caller's argv,
working directory, environment and standard streams, and the caller gets the script's exit
status. What the script does is unchanged: only the interpreter's start-up is shared.

    server: python tests/forkserver.py SOCKET        (started by the `fork_python` fixture)
    client: the executable that fixture writes; studies get it as PYTHON=...

The client falls back to the real interpreter for anything but `client SCRIPT.py ARGS...`.
"""
import json
import os
import runpy
import socket
import sys

PRELOAD = ("numpy", "torch", "torchvision", "matplotlib.figure", "checkpoint", "data", "models", "runtime",
           "evaluate", "train")

CLIENT = '''#!{python} -S
import json, os, socket, sys
args = sys.argv[1:]
if not args or not args[0].endswith(".py") or not os.path.exists({socket!r}):
    os.execv({python!r}, [{python!r}, *args])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect({socket!r})
msg = json.dumps({{"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(s, [len(msg).to_bytes(8, "big") + msg], [0, 1, 2])
rc = b""
while len(rc) < 4:
    part = s.recv(4 - len(rc))
    if not part:
        sys.exit(70)  # the server went away
    rc += part
sys.exit(int.from_bytes(rc, "big", signed=True))
'''


def write_client(path, socket_path):
    path.write_text(CLIENT.format(python=sys.executable, socket=str(socket_path)))
    path.chmod(0o755)


def _recv(conn):
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    size = int.from_bytes(msg[:8], "big")
    while len(msg) < 8 + size:
        msg += conn.recv(8 + size - len(msg))
    return json.loads(msg[8:]), fds


def _child(request, fds):
    """In the forked process: become the script's process, run it, exit with its status."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    import torch
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    rc = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def serve(socket_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in PRELOAD:
        __import__(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(16)
    print("ready", flush=True)
    parent = os.getppid()
    server.settimeout(5)
    while True:
        try:
            conn, _ = server.accept()
        except socket.timeout:
            if os.getppid() != parent:  # pytest is gone (killed): do not outlive it
                return
            continue
        conn.settimeout(None)
        request, fds = _recv(conn)
        if os.fork() == 0:  # one process per run: it forks the script's process and reports its status
            server.close()
            pid = os.fork()
            if pid == 0:
                conn.close()
                _child(request, fds)
            for fd in fds:
                os.close(fd)
            _, status = os.waitpid(pid, 0)
            conn.sendall(os.waitstatus_to_exitcode(status).to_bytes(4, "big", signed=True))
            os._exit(0)
        for fd in fds:
            os.close(fd)
        conn.close()
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


if __name__ == "__main__":
    serve(sys.argv[1])
