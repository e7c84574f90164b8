"""Issue 15: a bounded fuzz run of the project's own OpenAPI document (schemathesis) against a real
`spendledger serve`, authenticated with the master key, over every operation: no answer is a 5xx,
and every answer is one the document describes (its status, media type, body schema and headers;
streams event by event).

Bounded for CI: `EXAMPLES` generated cases per operation for valid and for invalid input (the
fuzzing phase), derandomized with a fixed seed, so every run sends the same requests. The whole file
took 50.5 s on this 2-core machine (`time pytest tests/adversarial/test_openapi_fuzz.py`: 56
operations, ~1,400 generated requests, 54 of them answered by a provider, and the probes of
`ignored_auth`; server start, database and collection included).

Left out of the CI run, and why:
- the coverage phase (deterministic boundary values: empty and 256/1,024-character strings, each
  limit ± 1, every wrong type): its cases number by the schema, not by `EXAMPLES`, and generating
  them costs ~50 s here. When this test was written it ran with 100 to 500 examples per operation
  and other seeds (also, in a variant, with an internal_user's and a proxy_admin_viewer's key):
  clean, once the one bug it found was fixed (a prompt of token ids made the mock provider raise:
  test_bad_input_never_500.py). Run it again with
  `SPENDLEDGER_FUZZ_COVERAGE=1 SPENDLEDGER_FUZZ_EXAMPLES=300 SPENDLEDGER_FUZZ_SEED=<n>`.
- the stateful phase: the document declares no links between operations.

The document fuzzed is built from the app in process at collection time (schemathesis's pytest
integration needs it then; its lazy `from_fixture` loader does not run on pytest 9); the first test
checks that the server answers exactly this document at /schema/openapi.json.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.conftest import MASTER_KEY, proxy_config
from tests.fakes.upstream import RunningUpstream
from tests.support import PostgresForTests, RunningServer, openapi_document, run_server

if "PYTEST_XDIST_WORKER" in os.environ:  # schemathesis would fuzz one operation there, not all of them
    raise pytest.UsageError(f"{__file__}: run without pytest-xdist (-p no:xdist), as scripts/test does")

EXAMPLES = int(os.environ.get("SPENDLEDGER_FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("SPENDLEDGER_FUZZ_SEED", "15"))
COVERAGE = os.environ.get("SPENDLEDGER_FUZZ_COVERAGE") == "1"
# The models of proxy_config: the fake provider's (chat, completions, embeddings) and the built-in mock.
MODELS = ("fake-openai-endpoint", "gpt-3.5-turbo", "text-embedding-3-small", "mock-model")

DOCUMENT = openapi_document(proxy_config("http://upstream.invalid"))
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": {"Authorization": f"Bearer {MASTER_KEY}"},
            "generation": {"max-examples": EXAMPLES, "deterministic": True, "mode": "all"},
            "phases": {"coverage": {"enabled": COVERAGE}, "stateful": {"enabled": False}},
        }
    ),
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    ignored_auth,  # a success with the key is also refused without one, and with a wrong one
]
# Left out: `negative_data_rejection`, because not all input the document calls invalid is refused,
# by design. The LLM routes validate what decides admission and billing and forward the rest untouched
# (message roles, content parts, fields they do not know) for the provider to judge, as OpenAI's API
# does. The management routes' bodies are decoded leniently (Litestar converts with msgspec's
# strict=False): `"blocked": 0` or `"true"`, `"rpm_limit": "7"` are accepted, as LiteLLM's pydantic
# models accept them. `positive_data_acceptance`: input the schemas allow is still refused when it
# names something that does not exist (404) or breaks a rule across fields (400).


@schema.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """Mostly a model of the config in the LLM routes' bodies (else the generated name; an empty
    one, invalid, is kept): random names only ever reach the 404 of an unknown model, never the
    provider, the hold or the ledger."""
    if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"]:
        return st.sampled_from([*MODELS, body["model"]]).map(lambda model: {**body, "model": model})
    return st.just(body)


@pytest.fixture(scope="module")
def server(postgres: PostgresForTests, upstream: RunningUpstream) -> Iterator[RunningServer]:
    url = postgres.new_database()
    with run_server(proxy_config(upstream.base_url), url) as running:
        yield running
    postgres.drop_database(url)


def test_the_server_answers_the_document_fuzzed(server: RunningServer) -> None:
    response = httpx.get(f"{server.base_url}/schema/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    assert response.json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_answer_is_a_server_error_or_undocumented(case: schemathesis.Case, server: RunningServer) -> None:
    logged = len(server.log())
    case.call_and_validate(base_url=server.base_url, checks=CHECKS, timeout=30)
    # Also what answered no 5xx: a failure after a stream's headers were sent, in a background task.
    assert "unhandled_error" not in server.log()[logged:], server.log()[logged:][-4000:]
