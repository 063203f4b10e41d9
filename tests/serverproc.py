"""Start the real server as a separate process on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildProcess:
    """A process a test starts (`self.proc`): stopped politely, or killed like a crash."""

    proc: subprocess.Popen | None = None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


class ServerProcess(ChildProcess):
    """`command` defaults to `python -m server serve` run from the repository; pass the
    installed console script and another `cwd` to test the entry point as a user runs it."""

    def __init__(self, data_dir: Path, workflows: Path, handler_modules: list[str] | None = None, *,
                 command: list[str] | None = None, cwd: Path = REPO, **env: str) -> None:
        self.data_dir = data_dir
        self.command = command or [sys.executable, "-m", "server", "serve"]
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = data_dir / "empty-config.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text("{}\n")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BATON_")},  # only what the test sets
            "PYTHONPATH": str(REPO),
            "BATON_CONFIG": str(config),
            "BATON_DATA_DIR": str(data_dir),
            "BATON_WORKFLOWS": json.dumps([str(workflows)]),
            "BATON_HANDLER_MODULES": json.dumps(handler_modules or []),
            "BATON_PORT": str(self.port),
            "BATON_LOG_LEVEL": "WARNING",
            "BATON_AUTH__ENABLED": "false",  # tests of auth turn it on and pass tokens
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / "server.log"

    def start(self, timeout_s: float = 20.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
                try:
                    if self.request("GET", "/healthz")[0] == 200:
                        return
                except OSError:
                    pass
                time.sleep(0.05)
            raise TimeoutError(f"server not healthy within {timeout_s}s:\n{self.log.read_text()[-3000:]}")
        except BaseException:
            # never leave a half-started server behind (its embedded nats-server dies with it: PDEATHSIG)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            raise

    def request(self, method: str, path: str, body: Any = None, timeout_s: float = 10.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_for(self, predicate, what: str, timeout_s: float = 15.0, interval_s: float = 0.05) -> Any:
        """Poll until predicate() returns a truthy value; bounded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval_s)
        raise TimeoutError(f"timed out waiting for {what}")
