"""Schemathesis against the real server: every operation of /openapi.json, fuzzed.

One `baton serve` process on loopback (auth on, an admin token, embedded NATS, two
workflows and a few runs so lists are not empty) serves the whole module. For each
operation schemathesis generates requests from the document, valid and invalid ones,
and checks that the server never answers 5xx, that every status, media type and
header (X-Request-Id) it answers is documented, and that every body matches its
documented schema.

Bounded: a few examples per operation, derandomized (the same cases every run), and a
short request timeout. `GET /v1/runs/{run_id}/wait` is fuzzed with `timeout=0`: it is
a long poll, and a generated timeout of up to a minute per case would only measure
patience (the run ids schemathesis makes up name no run anyway).
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.api.auth import hash_token, new_token
from server.api.openapi import document
from server.client import BatonClient
from tests.sample_workflows import APPROVAL, GREET
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 8  # fuzzed cases per operation (plus its coverage cases): ~25 operations in ~10 s
TOKEN = new_token()
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def baton(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schemathesis")
    wf = tmp / "wf"
    wf.mkdir()
    (wf / "greet.yaml").write_text(GREET)
    (wf / "approval.yaml").write_text(APPROVAL)
    tokens = json.dumps([{"name": "fuzz-admin", "sha256": hash_token(TOKEN), "roles": ["admin"]}])
    # embedded NATS on a free port: with NATS on, dead-letter replay answers 404 for an
    # unknown id instead of 503 "NATS is off", so a 5xx stays a finding
    server = ServerProcess(tmp / "data", wf, BATON_AUTH__ENABLED="true", BATON_AUTH__TOKENS=tokens,
                           BATON_NATS__EMBEDDED_PORT="-1")
    server.start()
    try:
        client = BatonClient(server.url, token=TOKEN)
        done = client.start("greet", {"name": "ada"}, workflow_id="fuzz-1")[0]
        client.wait(done["run_id"], 10)
        client.start("approval", None)  # stays open, waiting for its signal
        yield server
    finally:
        server.stop()


# Built from the same route table the server serves (test_served_document_is_the_fuzzed_one
# checks that), so pytest can list one test per operation before the server starts.
# (schemathesis.pytest.from_fixture would load it from the server, but it breaks on pytest 9.)
schema = schemathesis.openapi.from_dict(document(), config=schemathesis.Config.from_dict({
    "headers": {"Authorization": f"Bearer {TOKEN}"},
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
    "request-timeout": 10,
}))


def test_served_document_is_the_fuzzed_one(baton):
    with urllib.request.urlopen(f"{baton.url}/openapi.json", timeout=10) as response:
        assert json.loads(response.read()) == json.loads(json.dumps(document()))


@schema.parametrize()
def test_api(case, baton):
    if case.operation.path.endswith("/wait"):
        case.query = {**(case.query or {}), "timeout": 0}  # see the module's docstring
    case.call_and_validate(base_url=baton.url, checks=CHECKS)
