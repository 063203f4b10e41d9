"""A small synchronous client of the Baton HTTP API, for the CLI (stdlib only).

Every failure is a `ClientError`: an error body from the server keeps its code,
message and field; a server that cannot be reached gets status 0 and a message
that says what to do about it.
"""

from __future__ import annotations

import csv
import io
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

# Added to a long poll's own timeout so the socket outlives the server's wait.
LONG_POLL_MARGIN_S = 10.0


class ClientError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class BatonClient:
    def __init__(self, url: str, timeout_s: float = 30.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.token = token

    # --- runs ---------------------------------------------------------------------

    def start(
        self, workflow: str, input: Any, *, workflow_id: str | None = None, version: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Returns (run summary, created); created is False for an already open workflow_id."""
        body = {"input": input, "workflow_id": workflow_id, "version": version}
        status, run = self._call("POST", f"/v1/workflows/{_q(workflow)}/runs", body=body)
        return run, status == 201

    def runs(
        self, *, workflow: str | None = None, status: str | None = None, workflow_id: str | None = None,
        since: str | None = None, until: str | None = None, limit: int | None = None, cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        query = {"workflow": workflow, "status": status, "workflow_id": workflow_id,
                 "since": since, "until": until, "limit": limit, "cursor": cursor}
        page = self._get("/v1/runs", query)
        return page["runs"], page["next_cursor"]

    def run(self, run_id: str) -> dict[str, Any]:
        return self._get(f"/v1/runs/{_q(run_id)}")

    def history(self, run_id: str, *, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        return self._get(f"/v1/runs/{_q(run_id)}/history", {"after": after, "limit": limit})["events"]

    def all_history(self, run_id: str, page_size: int = 1000) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while True:
            page = self.history(run_id, after=events[-1]["seq"] if events else 0, limit=page_size)
            events += page
            if len(page) < page_size:
                return events

    def history_csv(self, run_id: str, page_size: int = 10_000) -> str:
        """The whole history as the server's CSV export, one header row, page by page."""
        out, after = "", 0
        while True:
            query = urllib.parse.urlencode({"format": "csv", "after": after, "limit": page_size})
            text = self._send("GET", f"/v1/runs/{_q(run_id)}/history?{query}", None, self.timeout_s)[1].decode()
            out += text if not out else text.partition("\n")[2]  # drop the repeated header
            rows = list(csv.reader(io.StringIO(text)))[1:]
            if len(rows) < page_size:
                return out
            after = int(rows[-1][0])

    def signal(self, run_id: str, name: str, data: Any = None) -> dict[str, Any]:
        return self._call("POST", f"/v1/runs/{_q(run_id)}/signals/{_q(name)}", body={"data": data})[1]

    def cancel(self, run_id: str, reason: str | None = None) -> dict[str, Any]:
        body = {"reason": reason} if reason else None
        return self._call("POST", f"/v1/runs/{_q(run_id)}/cancel", body=body)[1]

    def retry(self, run_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/runs/{_q(run_id)}/retry")[1]

    def wait(self, run_id: str, timeout_s: float) -> dict[str, Any]:
        """The run summary once terminal, or as it is after timeout_s (the server caps it)."""
        path = f"/v1/runs/{_q(run_id)}/wait?" + urllib.parse.urlencode({"timeout": timeout_s})
        return self._call("GET", path, read_timeout_s=timeout_s + LONG_POLL_MARGIN_S)[1]

    def dead_letters(self, *, limit: int = 20, cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        page = self._get("/v1/dead-letters", {"limit": limit, "cursor": cursor})
        return page["dead_letters"], page.get("next_cursor")

    def replay_dead_letter(self, id: int) -> dict[str, Any]:
        return self._call("POST", f"/v1/dead-letters/{int(id)}/replay")[1]

    # --- workflows and probes -------------------------------------------------------

    def workflows(self) -> list[dict[str, Any]]:
        return self._get("/v1/workflows")["workflows"]

    def workflow(self, name: str) -> dict[str, Any]:
        return self._get(f"/v1/workflows/{_q(name)}")

    def health(self) -> dict[str, Any]:
        return self._get("/healthz")

    # --- plumbing -----------------------------------------------------------------

    def _get(self, path: str, query: dict[str, Any] | None = None) -> Any:
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            path += "?" + urllib.parse.urlencode(params)
        return self._call("GET", path)[1]

    def _call(
        self, method: str, path: str, *, body: Any = None, read_timeout_s: float | None = None
    ) -> tuple[int, Any]:
        data = None if body is None else orjson.dumps(body)
        status, raw = self._send(method, path, data, read_timeout_s or self.timeout_s)
        return status, orjson.loads(raw) if raw else None

    def _send(self, method: str, path: str, data: bytes | None, timeout_s: float) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            raise _from_http_error(exc) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                raise ClientError(0, "unreachable", f"cannot reach Baton at {self.url}: is the server running? (baton dev)") from None
            if isinstance(exc.reason, TimeoutError):
                raise ClientError(0, "timeout", f"Baton at {self.url} did not answer within {timeout_s:g}s") from None
            raise ClientError(0, "unreachable", f"cannot reach Baton at {self.url}: {exc.reason}") from None
        except TimeoutError:  # a timeout while reading the response
            raise ClientError(0, "timeout", f"Baton at {self.url} did not answer within {timeout_s:g}s") from None
        except ConnectionError as exc:
            raise ClientError(0, "unreachable", f"lost the connection to Baton at {self.url}: {exc}") from None


def _from_http_error(exc: urllib.error.HTTPError) -> ClientError:
    raw = exc.read()
    try:
        error = orjson.loads(raw)["error"]
        return ClientError(exc.code, error["code"], error["message"], error.get("field"))
    except (orjson.JSONDecodeError, KeyError, TypeError):  # not our JSON: a proxy in between, say
        text = raw.decode("utf-8", "replace").strip()[:200] or str(exc.reason)
        return ClientError(exc.code, f"http_{exc.code}", f"HTTP {exc.code}: {text}")


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")
