"""A small synchronous client of the Baton HTTP API, for the CLI (stdlib only).

Every failure is a `ClientError`: an error body from the server keeps its code,
message and field; a server that cannot be reached gets status 0 and a message
that says what to do about it.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson

# Added to a long poll's own timeout so the socket outlives the server's wait.
LONG_POLL_MARGIN_S = 10.0
# An export is read and handed on in pieces of this size, never whole.
EXPORT_CHUNK_BYTES = 64 * 1024


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
        after: int | None = 0
        while after is not None:  # the server says where the next page starts, null after the last
            page = self._get(f"/v1/runs/{_q(run_id)}/history", {"after": after, "limit": page_size})
            events += page["events"]
            after = page["next_after"]
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

    def trace(self, run_id: str) -> dict[str, Any]:
        return self._get(f"/v1/runs/{_q(run_id)}/trace")

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

    # --- approvals ----------------------------------------------------------------

    def approvals(self, *, status: str = "pending", limit: int = 20,
                  cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        page = self._get("/v1/approvals", {"status": status, "limit": limit, "cursor": cursor})
        return page["approvals"], page.get("next_cursor")

    def decide(self, run_id: str, decision: str, *, comment: str | None = None,
               step: str | None = None) -> dict[str, Any]:
        """Approve or reject the run's pending approval: {"approval", "run"}."""
        body = {"decision": decision, "comment": comment, "step": step}
        return self._call("POST", f"/v1/runs/{_q(run_id)}/approval", body=body)[1]

    # --- schedules and calendars --------------------------------------------------------

    def schedules(self) -> list[dict[str, Any]]:
        return self._get("/v1/schedules")["schedules"]

    def schedule(self, name: str) -> dict[str, Any]:
        return self._get(f"/v1/schedules/{_q(name)}")

    def schedule_fires(self, name: str, *, limit: int | None = None,
                       cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Fire records, newest first: the runs started, and why other fires started none."""
        page = self._get(f"/v1/schedules/{_q(name)}/fires", {"limit": limit, "cursor": cursor})
        return page["fires"], page["next_cursor"]

    def pause_schedule(self, name: str, note: str | None = None) -> dict[str, Any]:
        body = {"note": note} if note is not None else None
        return self._call("POST", f"/v1/schedules/{_q(name)}/pause", body=body)[1]

    def resume_schedule(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/schedules/{_q(name)}/resume")[1]

    def run_schedule(self, name: str) -> dict[str, Any]:
        """Fire the schedule now: {"schedule", "run_id", "scheduled_at"}."""
        return self._call("POST", f"/v1/schedules/{_q(name)}/run")[1]

    def calendars(self) -> list[dict[str, Any]]:
        return self._get("/v1/calendars")["calendars"]

    # --- audit log and exports --------------------------------------------------------

    def audit(
        self, *, since: str | None = None, until: str | None = None, actor: str | None = None,
        action: str | None = None, limit: int | None = None, cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        query = {"since": since, "until": until, "actor": actor, "action": action, "limit": limit, "cursor": cursor}
        page = self._get("/v1/audit", query)
        return page["entries"], page["next_cursor"]

    def export(
        self, what: str, *, fmt: str = "csv", since: str | None = None, until: str | None = None,
        workflow: str | None = None, status: str | None = None,
    ) -> Iterator[bytes]:
        """The body of `GET /v1/export/<what>` in pieces as they arrive (runs or steps; csv or jsonl).
        A transfer cut short raises ClientError (code `truncated`) after the pieces that came."""
        query = {"format": fmt, "since": since, "until": until, "workflow": workflow, "status": status}
        path = f"/v1/export/{_q(what)}?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        with self._open("GET", path, None, self.timeout_s) as response:
            while chunk := response.read1(EXPORT_CHUNK_BYTES):
                yield chunk

    # --- workflows and probes -------------------------------------------------------

    def workflows(self) -> list[dict[str, Any]]:
        return self._get("/v1/workflows")["workflows"]

    def workflow(self, name: str) -> dict[str, Any]:
        return self._get(f"/v1/workflows/{_q(name)}")

    def workflow_versions(self, name: str) -> dict[str, Any]:
        return self._get(f"/v1/workflows/{_q(name)}/versions")

    def workflow_version(self, name: str, version: str) -> dict[str, Any]:
        return self._get(f"/v1/workflows/{_q(name)}/versions/{_q(version)}")

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
        with self._open(method, path, data, timeout_s) as response:
            return response.status, response.read()

    @contextlib.contextmanager
    def _open(self, method: str, path: str, data: bytes | None, timeout_s: float) -> Iterator[http.client.HTTPResponse]:
        """The response, to read inside the block; failures, reading included, are ClientErrors."""
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                yield response
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
        except http.client.IncompleteRead:  # the server cut the transfer: what came is not all there is
            raise ClientError(0, "truncated", f"Baton at {self.url} cut the response short; it is incomplete") from None


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
