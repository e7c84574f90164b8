"""The least a proxy of DESIGN.md's shape can do per request: the floor under spendledger's latency.

One route, served like spendledger (uvicorn, uvloop, httptools, a Litestar app) and forwarding
through spendledger's own upstream client (`api.upstream.Upstream`), with only the database work no
design of this shape can skip:

- `none`: no database at all — the HTTP path alone (server, framework, upstream client);
- `insert`: after the upstream answers, one row the size of a `UsageRecorded` appended to the log
  with a durable commit (no response before its usage is committed) — and nothing else: no
  admission, no projection, no outbox;
- `admit+insert`: the same, after an admission round trip that does nothing (`select 1`) before the
  upstream call.

It bills nothing and enforces nothing: `scripts/bench/floor.py` measures it beside spendledger.

    FLOOR_MODE=admit+insert FLOOR_CONFIG=spendledger.yaml DATABASE_URL=… \
        python -m uvicorn --factory scripts.bench.floor_app:create_app …
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import asyncpg
from litestar import Litestar, Request, Response, get, post

from spendledger.api.upstream import Upstream
from spendledger.ledger.config import load_settings
from spendledger.ledger.db import create_pool

MODES: Final = ("none", "insert", "admit+insert")
_APPEND: Final = (
    "insert into events (stream, version, type, data, metadata) "
    "values ('request:' || $1, 1, 'FloorRecorded', $2::jsonb, '{}')"
)

# A UsageRecorded's size (~700 bytes of JSON) and the fields the log's indexes read, so that the row,
# its index entries and the WAL the commit flushes are alike; its own type keeps it out of the
# ledger's readers and counts.
_EVENT: Final = (
    '{"type": "FloorRecorded", "call_id": "CALL_ID", "customer_id": "bench-customer", "key_hash": "'
    + "0" * 64
    + '", "model_group": "fake-openai-endpoint", "user_id": null, "team_id": null, "detail": "'
    + "x" * 450
    + '"}'
)


def create_app() -> Litestar:
    mode = os.environ["FLOOR_MODE"]
    if mode not in MODES:
        raise SystemExit(f"FLOOR_MODE must be one of {MODES}, not {mode!r}")
    deployment = load_settings(os.environ["FLOOR_CONFIG"]).deployments[0]

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.pool, app.state.upstream = await create_pool(os.environ["DATABASE_URL"]), Upstream()
        try:
            yield
        finally:
            await app.state.upstream.aclose()
            await app.state.pool.close()

    @get("/health")
    async def health() -> str:
        return "ok"

    @post("/chat/completions", status_code=200)
    async def chat(request: Request[None, None, None]) -> Response[bytes]:
        pool: asyncpg.Pool = request.app.state.pool
        upstream: Upstream = request.app.state.upstream
        body = await request.body()
        if mode == "admit+insert":
            await pool.fetchval("select 1")
        reply = await upstream.send(deployment, "/chat/completions", body, stream=False)
        if mode != "none":
            call_id = uuid.uuid4().hex
            await pool.execute(_APPEND, call_id, _EVENT.replace("CALL_ID", call_id))
        return Response(reply.content, media_type="application/json")

    return Litestar(route_handlers=[health, chat], lifespan=[lifespan])
