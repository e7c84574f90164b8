"""`POST /usage` (and `/v1/usage`): usage of LLM calls made outside the gateway (seed 003's SDK tab)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.di import Provide

from spendledger.api.auth import caller_of, requires
from spendledger.api.ingest import DocumentedBatch, UsageResults, decode_batch, ingest
from spendledger.api.jsonio import json_response
from spendledger.api.roles import Permission
from spendledger.api.schemas import BODY, documented
from spendledger.api.sdk_admission import AdmitRequest, Hold, admit_call
from spendledger.api.services import services_of


# Documentation only (Litestar documents a dependency's `data` as the request body and never calls
# it): the handler reads the body itself, each record on its own (api/ingest.py decode_batch).
def _reads_batch(data: DocumentedBatch) -> None:
    raise AssertionError("documentation only")


@post(
    ["/usage", "/v1/usage"],
    guards=[requires(Permission.CALL_MODELS)],
    tags=["usage"],
    status_code=200,
    summary="Record the usage of up to 1,000 calls made outside the gateway (idempotent by call_id)",
    dependencies={"documented_body": Provide(_reads_batch, sync_to_thread=False)},
    **documented(*BODY),
)
async def post_usage(request: Request[Any, Any, Any]) -> Response[UsageResults]:
    batch = decode_batch(await request.body())
    return json_response(await ingest(services_of(request), caller_of(request), batch))


@post(
    ["/usage/admit", "/v1/usage/admit"],
    guards=[requires(Permission.CALL_MODELS)],
    tags=["usage"],
    status_code=200,
    summary="Hold the worst-case cost of a call about to be made outside the gateway (or refuse it as the proxy would)",
    **documented(*BODY, 409, 429),
)
async def post_usage_admit(request: Request[Any, Any, Any], data: AdmitRequest) -> Response[Hold]:
    return json_response(await admit_call(services_of(request), caller_of(request), data))


route_handlers = [post_usage, post_usage_admit]
