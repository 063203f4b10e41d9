"""What the example tests share: the server as `baton dev` runs the examples, moto's
EC2 in server mode, and the stand-in services of handlers/examples/standins."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from handlers.examples.standins import mount
from tests.loopback import ThreadedApp
from tests.serverproc import REPO, ChildProcess, ServerProcess, free_port

TERMINAL = {"succeeded", "failed", "compensated", "cancelled", "timed_out"}


class ExampleServer(ServerProcess):
    """The real server with the repository's own `config/baton.yaml`, `config/workflows`
    and the handler modules that config names, as `baton dev` serves them; NATS is the
    test's nats-server and API authentication is off, as in `baton dev`.

    With `clock_start` (unix seconds) it runs `tests.examples.clockserver` instead: the
    same server with a clock that moves only by `set_clock`."""

    def __init__(self, data_dir: Path, nats_url: str, *, clock_start: float | None = None, **env: str) -> None:
        self.clock_port = free_port() if clock_start is not None else None
        command = [sys.executable, "-m", "tests.examples.clockserver"] if clock_start is not None else None
        extra = {"TEST_CLOCK_START": repr(clock_start), "TEST_CLOCK_PORT": str(self.clock_port)} if clock_start else {}
        super().__init__(data_dir, REPO / "config" / "workflows", command=command,
                         BATON_CONFIG=str(REPO / "config" / "baton.yaml"), BATON_NATS_URL=nats_url, **extra, **env)
        for key in ("BATON_WORKFLOWS", "BATON_HANDLER_MODULES"):  # as config/baton.yaml says
            self.env.pop(key)

    # --- the API ----------------------------------------------------------------------

    def ok(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        status, answer = self.request(method, path, body)
        assert status == expect, f"{method} {path}: {status} {answer}"
        return answer

    def run(self, run_id: str) -> dict[str, Any]:
        return self.ok("GET", f"/v1/runs/{run_id}")

    def wait_run(self, run_id: str, statuses: set[str] = TERMINAL, timeout_s: float = 30.0) -> dict[str, Any]:
        """The run once its status is one of `statuses` (default: any terminal one)."""
        def reached() -> dict[str, Any] | None:
            run = self.run(run_id)
            return run if run["status"] in statuses else None
        try:
            return self.wait_for(reached, f"run {run_id} to reach {sorted(statuses)}", timeout_s)
        except TimeoutError:
            raise AssertionError(f"run {run_id} is {self.run(run_id)['status']}, not in {sorted(statuses)}:\n"
                                 f"{self.log.read_text()[-3000:]}") from None

    def runs(self, workflow: str) -> list[dict[str, Any]]:
        return self.ok("GET", f"/v1/runs?workflow={workflow}&limit=200")["runs"]

    def steps(self, run_id: str) -> dict[str, dict[str, Any]]:
        """The run's steps by id (`key`), as `baton show` lists them."""
        return {s["key"]: s for s in self.run(run_id)["steps"]}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`baton ARGS...` against this server, as a user types it."""
        env = {**os.environ, "PYTHONPATH": str(REPO), "BATON_URL": self.url}
        done = subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        if check:
            assert done.returncode == 0, f"baton {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    # --- the test clock ---------------------------------------------------------------

    def _clock(self, body: dict[str, float] | None = None) -> dict[str, Any]:
        assert self.clock_port is not None, "started without clock_start"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.clock_port}/clock", data=data,
                                     method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def now(self) -> float:
        return self._clock()["now"]

    def set_clock(self, t: float) -> None:
        self._clock({"set": t})

    def wait_sleeping_until(self, deadline: float, what: str, timeout_s: float = 15.0) -> None:
        """Wait until something in the server sleeps until `deadline` (a schedule's next
        fire, an approval's timeout): moving the clock then cannot race its arming."""
        self.wait_for(lambda: any(abs(d - deadline) < 1e-3 for d in self._clock()["sleepers"]), what, timeout_s)


async def off_loop(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking call (the server's API, the clock) from an async test."""
    return await asyncio.to_thread(fn, *args, **kwargs)


class MotoServer(ChildProcess):
    """moto in server mode on a free loopback port: the AWS APIs without an account.
    `env` is what boto3 needs to talk to it instead of AWS (AWS_ENDPOINT_URL)."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout_s: float = 30.0) -> MotoServer:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"moto_server not up within {timeout_s}s:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.1)


class StandInServices(ThreadedApp):
    """Stand-in services from handlers/examples/standins, each under `/<name>/` as
    `python -m handlers.examples.standins` serves them, on a free loopback port.
    `states[name]` is the service's state: what it was sent, and its failure switches."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.names = names
        self.states: dict[str, Any] = {}

    def routes(self, app: web.Application) -> None:
        for name in self.names:
            self.states[name] = mount(app, name)

    def base(self, name: str) -> str:
        return f"{self.url}/{name}"
