"""Run a real Triton Inference Server on this machine: the one the `nvidia-pytriton` wheel ships (Triton
2.51 with the python backend only; x86_64, glibc >= 2.35), for tests, benchmarks and users without the
container.

    python -m centra.measure.tritonserver stub-env .venv/triton-stub   # once: a Python for the backend stub
    python -m centra.measure.tritonserver serve REPO                   # serve a repository until Ctrl-C
    with TritonServer(repo) as server:                                # loopback, free ports
        server.http_url, server.grpc_url

How it runs (what the wheel needs): its backends/ are copied to a folder of ours, with the backend stub
built for this Python put into python/; tritonserver runs with the wheel's nvidia_pytriton.libs on
LD_LIBRARY_PATH (after this Python's own libpython: the stub links libpython3.X.so, and one from another
build of 3.X breaks the stdlib's extension modules) and the stub's Python first on PATH (the stub embeds
the first `python3` it finds, with that interpreter's site-packages). That stub was built against numpy
1.x: under numpy 2 it hands the model garbage BYTES tensors. `stub_env` makes a small venv with numpy<2
that reads every other package from this environment (a .pth line), so the model imports this centra,
torch and onnxruntime.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from centra.errors import CentraError

STUB_ENV = "triton-stub"  # under sys.prefix: the default stub Python (make install creates it)
READY_TIMEOUT = 120.0


@dataclass(frozen=True)
class TritonInstall:
    server: Path  # the tritonserver binary
    backends: Path  # its backends/ folder (python/)
    stub: Path  # triton_python_backend_stub for this Python version
    libs: Path  # shared libraries the binary needs


def find_install() -> TritonInstall:
    """The nvidia-pytriton wheel's Triton, or a one-line CentraError saying why it cannot run here."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise CentraError(f"tritonserver from nvidia-pytriton runs on linux x86_64 only, not {sys.platform} "
                          f"{platform.machine()}")
    libc, version = platform.libc_ver()
    if libc == "glibc" and tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
        raise CentraError(f"tritonserver from nvidia-pytriton needs glibc >= 2.35, this machine has {version}")
    import importlib.util

    spec = importlib.util.find_spec("pytriton")  # located, not imported: its Python API's dependencies are not needed
    if spec is None or spec.origin is None:
        raise CentraError("nvidia-pytriton is not installed (pip install --no-deps nvidia-pytriton)")
    package = Path(spec.origin).resolve().parent
    root = package / "tritonserver"
    stub = root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
        "triton_python_backend_stub"
    libs = package.parent / "nvidia_pytriton.libs"
    install = TritonInstall(root / "bin" / "tritonserver", root / "backends", stub, libs)
    for path in (install.server, install.backends / "python", install.stub):
        if not path.exists():
            raise CentraError(f"{path}: missing from the nvidia-pytriton install")
    return install


def stub_python() -> Path:
    """The bin/ folder whose python3 the backend stub embeds: $CENTRA_TRITON_PYTHON, else this Python when its
    numpy is 1.x, else sys.prefix/triton-stub (see stub_env)."""
    given = os.environ.get("CENTRA_TRITON_PYTHON")
    if given:
        return Path(given)
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return Path(sys.executable).parent
    env = Path(sys.prefix) / STUB_ENV / "bin"
    if not (env / "python3").exists():
        raise CentraError(f"Triton's python backend stub needs numpy<2 and this Python has {numpy.__version__}: "
                          f"create its Python with `python -m centra.measure.tritonserver stub-env {env.parent}`")
    return env


def stub_env(dest: Path, numpy_spec: str = "numpy<2") -> Path:
    """A venv at dest for the backend stub: numpy<2 of its own, every other package read from this
    environment. Needs pip to reach an index (or its cache) once."""
    dest = Path(dest)
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", str(dest)], check=True)
    python = dest / "bin" / "python3"
    subprocess.run([str(python), "-m", "pip", "install", "-q", numpy_spec], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    mine = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "zz-centra-parent.pth").write_text(f"import site; site.addsitedir({mine!r})\n")
    return dest


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class TritonServer:
    """tritonserver on loopback over `repo`, on free ports; `explicit`: model control through the
    repository API, loading `models` at start."""

    def __init__(self, repo: Path, workdir: Path, *, explicit: bool = False, models: tuple[str, ...] = (),
                 log: Path | None = None):
        self.repo, self.workdir = Path(repo), Path(workdir)
        self.explicit, self.models = explicit, models
        self.log = log or self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = READY_TIMEOUT) -> TritonServer:
        install = find_install()
        python_bin = stub_python()
        backends = self.workdir / "backends"
        if not backends.exists():
            shutil.copytree(install.backends, backends)
            shutil.copy2(install.stub, backends / "python" / install.stub.name)
        # the stub links libpython3.X.so: this Python's own, not another build of 3.X whose stdlib differs
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{install.libs}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               "PATH": f"{python_bin}:{os.environ.get('PATH', '')}"}
        self.http_port, self.grpc_port = free_port(), free_port()
        command = [str(install.server), "--model-repository", str(self.repo), "--backend-directory", str(backends),
                   "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--http-port", str(self.http_port),
                   "--grpc-port", str(self.grpc_port), "--allow-metrics", "false", "--exit-timeout-secs", "10"]
        if self.explicit:
            command += ["--model-control-mode", "explicit", *(f"--load-model={m}" for m in self.models)]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import urllib.request

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise CentraError(f"tritonserver exited with code {self.process.returncode} (log: {self.log})")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise CentraError(f"tritonserver not ready within {timeout:.0f} s (log: {self.log})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="helpers for the nvidia-pytriton tritonserver")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stub-env", help="create the venv whose python3 Triton's python backend stub embeds")
    p.add_argument("dest", type=Path)
    p = sub.add_parser("serve", help="serve a repository (`centra export-triton`) on loopback until SIGTERM or "
                                     "Ctrl-C; the stub's Python must exist (stub-env)")
    p.add_argument("repo", type=Path)
    p.add_argument("--workdir", type=Path, help="where the backends and the log go (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.command == "stub-env":
        print(stub_env(args.dest))
        return 0
    return serve(args.repo, args.workdir)


def serve(repo: Path, workdir: Path | None = None) -> int:
    """tritonserver over `repo` in the foreground: its URLs printed, stopped on SIGTERM or Ctrl-C."""
    import signal
    import tempfile
    import threading

    if not Path(repo).is_dir():
        print(f"tritonserver: {repo}: no such repository folder", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory() as tmp:
        server = TritonServer(repo, workdir or Path(tmp))
        try:
            server.start()
        except CentraError as exc:
            print(f"tritonserver: {exc}", file=sys.stderr)
            return 2
        try:
            print(f"tritonserver serving {repo}: HTTP http://{server.http_url}, gRPC {server.grpc_url} "
                  f"(log: {server.log})", flush=True)
            while not stop.wait(0.5):
                if server.process.poll() is not None:
                    print(f"tritonserver exited with code {server.process.returncode} (log: {server.log})",
                          file=sys.stderr)
                    return 1
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
