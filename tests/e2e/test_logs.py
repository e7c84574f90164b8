"""Every line the server writes is one JSON object (issue 19): ours, uvicorn's and the libraries'
(alembic's migration lines at start, shown at DEBUG) alike, and none holds a key or a prompt — not
even at DEBUG."""

from __future__ import annotations

import json

import httpx

from tests.e2e.conftest import MASTER_KEY, proxy_config
from tests.fakes.upstream import RunningUpstream
from tests.support import PostgresForTests, run_server


def test_every_line_is_json_and_the_libraries_lines_are_ours_too(
    postgres: PostgresForTests, upstream: RunningUpstream
) -> None:
    url = postgres.new_database()
    secret_prompt = "the launch code is 0451"
    try:
        with run_server(proxy_config(upstream.base_url), url, args=["--log-level", "DEBUG"]) as server:
            answer = httpx.post(
                f"{server.base_url}/chat/completions", headers={"Authorization": f"Bearer {MASTER_KEY}"},
                json={"model": "fake-openai-endpoint", "messages": [{"role": "user", "content": secret_prompt}]},
                timeout=30,
            )  # fmt: skip
            assert answer.status_code == 200
            log = server.log()
    finally:
        postgres.drop_database(url)
    lines = [line for line in log.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # each line parses, or this fails naming it
    assert all("event" in r and "level" in r and "timestamp" in r for r in records), lines
    assert any(r.get("logger", "").startswith("alembic") for r in records), "alembic's lines are ours"
    assert MASTER_KEY not in log and secret_prompt not in log
