"""The OpenAI-compatible routes: chat completions, completions, embeddings, models."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.di import Provide

from api.auth import Caller, authenticate
from api.enforcement import admit
from api.errors import ApiError, bad_request
from api.jsonio import json_response
from api.proxy import Exchange, forward, record
from api.request_body import customer_of, decode_body, shape_of, upstream_body
from api.roles import Permission
from api.services import services_of
from api.streaming import forward_stream

_MODEL_CREATED = 1677610602  # OpenAI's list shows a creation time; ours are config entries


async def _caller(request: Request[Any, Any, Any]) -> Caller:
    return await authenticate(request)


async def _proxy(route: str, request: Request[Any, Any, Any]) -> Response[Any]:
    # Authenticated here rather than as a Litestar dependency: on the hot path, resolving the
    # dependency and validating the handler's signature cost more than the lookup itself.
    caller = await authenticate(request)
    caller.require(Permission.CALL_MODELS)  # a proxy_admin_viewer reads, never spends (403)
    services = services_of(request)
    raw = await request.body()
    body = decode_body(raw)
    head = body.head
    if head.stream and route == "embeddings":
        raise bad_request("Embeddings cannot be streamed", param="stream")
    if not caller.allows_model(head.model):
        raise ApiError(
            401,
            f"API key not allowed to access model {head.model!r}. Allowed models: "
            f"{list(caller.key.models) if caller.key else []}",
            "key_model_access_denied",
            param="model",
        )
    deployment = services.router.pick(head.model)
    if deployment is None:
        raise ApiError(
            404,
            f"The model {head.model!r} does not exist. Available models: "
            f"{', '.join(services.router.model_names)}",
            "invalid_request_error",
            code="model_not_found",
            param="model",
        )
    price = services.prices.price(deployment.deployment_id)
    if price is None and services.settings.reject_unpriced_models:
        raise ApiError(
            400,
            f"The model {head.model!r} has no price and reject_unpriced_models is set",
            "invalid_request_error",
            code="model_unpriced",
            param="model",
        )
    exchange = Exchange(
        route, caller, head, deployment, price, caller.customer_for(customer_of(head, request.headers))
    )
    outgoing = upstream_body(body, raw, deployment)
    await admit(services, exchange, shape_of(route, head, len(outgoing)))
    try:
        if head.stream:
            return await forward_stream(services, exchange, outgoing)
        return await forward(services, exchange, outgoing)
    except Exception:
        if not exchange.recorded:
            # A bug of ours between admission and recording: still close the books on the request,
            # which also gives its hold back now rather than at expiry.
            event = exchange.usage_event(status="failure", http_status=500, error_type="internal_error")
            services.spawn(record(services, exchange, event))
        raise


_dependencies = {"caller": Provide(_caller)}


@post(
    ["/chat/completions", "/v1/chat/completions"],
    status_code=200,
    summary="Create a chat completion (OpenAI-compatible)",
)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    return await _proxy("chat.completions", request)


@post(
    ["/completions", "/v1/completions"],
    status_code=200,
    summary="Create a completion (OpenAI-compatible)",
)
async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
    return await _proxy("completions", request)


@post(
    ["/embeddings", "/v1/embeddings"],
    status_code=200,
    summary="Create embeddings (OpenAI-compatible)",
)
async def embeddings(request: Request[Any, Any, Any]) -> Response[Any]:
    return await _proxy("embeddings", request)


@get(["/models", "/v1/models"], dependencies=_dependencies, summary="Models this key may use")
async def list_models(request: Request[Any, Any, Any], caller: Caller) -> Response[Any]:
    names = [name for name in services_of(request).router.model_names if caller.allows_model(name)]
    data = [
        {"id": name, "object": "model", "created": _MODEL_CREATED, "owned_by": "spendledger"}
        for name in names
    ]
    return json_response({"object": "list", "data": data})


route_handlers = [chat_completions, completions, embeddings, list_models]
