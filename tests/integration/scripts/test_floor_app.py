"""The benchmark's floor app (scripts/bench/floor_app.py) does what its floor claims, and no more:
it forwards the body and returns the upstream's answer, and appends one durable log row per request
(`insert`, `admit+insert`) or none (`none`) — never a UsageRecorded the ledger would count."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from scripts.bench.floor_app import create_app
from tests.fakes.upstream import RunningUpstream, run_fake_upstream

CHAT = b'{"model":"fake-openai-endpoint","messages":[{"role":"user","content":"say something"}]}'


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningUpstream]:
    with run_fake_upstream() as running:
        yield running


@pytest.fixture
def config(tmp_path: Path, upstream: RunningUpstream) -> Path:
    path = tmp_path / "floor.yaml"
    path.write_text(
        "model_list:\n  - model_name: fake-openai-endpoint\n    litellm_params:\n      model: openai/fake\n"
        f"      api_key: floor-upstream\n      api_base: {upstream.base_url}\n"
    )
    return path


@pytest.mark.parametrize(("mode", "rows"), [("none", 0), ("insert", 2), ("admit+insert", 2)])
async def test_forwards_and_appends_one_row_per_request_in_its_mode(
    mode: str, rows: int, config: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOOR_MODE", mode)
    monkeypatch.setenv("FLOOR_CONFIG", str(config))
    monkeypatch.setenv("DATABASE_URL", database_url)
    async with AsyncTestClient(app=create_app()) as client:
        for _ in range(2):
            reply = await client.post("/chat/completions", content=CHAT)
            assert reply.status_code == 200
            assert reply.json()["usage"]["total_tokens"] > 0  # the upstream's answer, as it sent it
    conn = await asyncpg.connect(database_url)
    try:
        types = [r["type"] for r in await conn.fetch("select type from events")]
    finally:
        await conn.close()
    assert types == ["FloorRecorded"] * rows


def test_an_unknown_mode_stops_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOOR_MODE", "settle")
    with pytest.raises(SystemExit, match="FLOOR_MODE"):
        create_app()
