"""The OpenAI-compatible routes: chat completions, completions, embeddings, models.

The LLM routes read their body themselves (api/request_body.py: the fields that decide admission
and billing, validated; the rest forwarded untouched) and answer the provider's body as it came. The
Structs below describe both for the OpenAPI document, in OpenAI's shapes: the fields every
OpenAI-compatible provider sends are required, the rest may be absent; others may be present.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, get, post
from litestar.di import Provide
from msgspec import Meta

from spendledger.api.auth import Caller, authenticate
from spendledger.api.enforcement import admit
from spendledger.api.errors import ApiError, bad_request
from spendledger.api.forwarding import forward
from spendledger.api.jsonio import json_response
from spendledger.api.proxy import Exchange, record
from spendledger.api.request_body import Finite, Tokens, customer_of, decode_body, shape_of, upstream_body
from spendledger.api.roles import Permission
from spendledger.api.schemas import documented, header, sse_events
from spendledger.api.services import services_of
from spendledger.api.streaming import forward_stream
from spendledger.ledger.config import Deployment
from spendledger.ledger.events import Route
from spendledger.ledger.identifiers import ID_MAX_LENGTH, ID_PATTERN, ID_RULE

_MODEL_CREATED = 1677610602  # OpenAI's list shows a creation time; ours are config entries

# --- what the OpenAPI document says the LLM routes read and answer -------------------------------

CustomerId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=ID_MAX_LENGTH,
        pattern=ID_PATTERN,
        description=f"The customer (end user) billed: {ID_RULE}; else the x-litellm-customer-id header",
    ),
]


class ContentPart(msgspec.Struct, kw_only=True):
    """A part of a message: text, or a media part (image_url, input_audio, file …) held at its cost."""

    type: str
    text: str | msgspec.UnsetType = msgspec.UNSET


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False  # usage is always accounted; this asks for the usage chunk


ModelName = Annotated[str, Meta(min_length=1, description="A model_name of the config (GET /models)")]


class _LlmRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    user: CustomerId | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Tokens | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    temperature: Finite | None = None
    top_p: Finite | None = None
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None


class ChatCompletionRequest(_LlmRequest, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: Tokens | None = None


class CompletionRequest(_LlmRequest, kw_only=True):
    prompt: str | list[str | int | list[int]]  # a text, a token list, or a list of either
    best_of: Annotated[int, Meta(ge=1, le=20)] | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    input: str | list[str | int | list[int]]  # a text, a token list, or a list of either
    user: CustomerId | None = None
    encoding_format: Literal["float", "base64"] | msgspec.UnsetType = msgspec.UNSET
    dimensions: int | msgspec.UnsetType = msgspec.UNSET


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int | msgspec.UnsetType = msgspec.UNSET
    total_tokens: int


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str  # "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None  # absent: the proxy bills an estimate (usage_estimated)


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None = None


class Completion(msgspec.Struct, kw_only=True):
    id: str
    object: str  # "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(msgspec.Struct, kw_only=True):
    object: str  # "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 with encoding_format=base64


class Embeddings(msgspec.Struct, kw_only=True):
    object: str  # "list"
    data: list[Embedding]
    model: str
    usage: Usage | None = None


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[Model]


# The body each LLM route reads, named by a dependency the handler never asks for: Litestar documents
# a dependency's `data` as the operation's request body, and never calls (nor decodes for) it.
def _reads_chat(data: ChatCompletionRequest) -> None:
    raise AssertionError("documentation only")


def _reads_completion(data: CompletionRequest) -> None:
    raise AssertionError("documentation only")


def _reads_embeddings(data: EmbeddingRequest) -> None:
    raise AssertionError("documentation only")


def _body(reads: Any) -> dict[str, Provide]:
    return {"documented_body": Provide(reads, sync_to_thread=False)}


# 400 includes the provider's own 4xx (but 401 and 403, a 502), passed through in the envelope.
_LLM_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503, 504)
_SSE = {"text/event-stream": sse_events('"stream": true: a chunk (JSON) as the provider sent it, last `[DONE]`')}
_HEADERS = [
    header("x-litellm-call-id", "The request's id in the ledger (spend logs, audit, Lago)"),
    header("x-litellm-model-id", "The deployment that served the request"),
    header("x-litellm-model-group", "The model asked for"),
    header("x-litellm-response-cost", "The request's exact cost in USD (not on streams)"),
    header("x-litellm-key-spend", "The key's spend after the request (not on streams)"),
    header("x-litellm-attempted-retries", "Retries the router made (README, Router settings)"),
    header("x-litellm-attempted-fallbacks", "Fallback model groups the router tried"),
    header("x-litellm-response-duration-ms", "The request's time until its response began, ms"),
    header("x-litellm-overhead-duration-ms", "The gateway's own part of it (the providers' calls left out), ms"),
    header("llm_provider-x-request-id", "The provider's request id (its rate-limit headers likewise)"),
]


async def _caller(request: Request[Any, Any, Any]) -> Caller:
    return await authenticate(request)


async def _proxy(route: Route, request: Request[Any, Any, Any]) -> Response[Any]:
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
    if not services.router.has(head.model):
        raise ApiError(
            404,
            f"The model {head.model!r} does not exist. Available models: "
            f"{', '.join(services.router.model_names)}",
            "invalid_request_error",
            code="model_not_found",
            param="model",
        )
    group = services.router.deployments(head.model)  # without the unpriced, under reject_unpriced_models
    if not group:
        raise ApiError(
            400,
            f"The model {head.model!r} has no price and reject_unpriced_models is set",
            "invalid_request_error",
            code="model_unpriced",
            param="model",
        )
    deployment = group[0]  # until the router calls one (api/attempts.py)
    exchange = Exchange(
        route,
        caller,
        head,
        deployment,
        services.prices.price(deployment.deployment_id),
        caller.customer_for(customer_of(head, request.headers)),
    )
    bodies: dict[str, bytes] = {}

    def body_for(target: Deployment) -> bytes:
        found = bodies.get(target.upstream_model)
        if found is None:
            found = bodies[target.upstream_model] = upstream_body(body, raw, target)
        return found

    ticket = await admit(services, exchange, shape_of(route, body))
    try:
        if head.stream:
            return await forward_stream(services, exchange, ticket, body_for)
        return await forward(services, exchange, ticket, body_for)
    except Exception:
        if not ticket.closed:
            # A bug of ours between admission and recording: still close the books on the request,
            # which also gives its hold back now rather than at expiry.
            event = exchange.usage_event(ticket, status="failure", http_status=500, error_type="internal_error")
            services.background.spawn(record(exchange, ticket, event))
        raise
    except BaseException:
        ticket.abandon()  # cancelled before it could settle (a no-op once it has begun to)
        raise


_dependencies = {"caller": Provide(_caller)}


@post(
    ["/chat/completions", "/v1/chat/completions"],
    status_code=200,
    summary="Create a chat completion (OpenAI-compatible)",
    dependencies=_body(_reads_chat),
    response_headers=_HEADERS,
    **documented(*_LLM_ERRORS, also=_SSE),
)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[ChatCompletion]:
    return await _proxy("chat.completions", request)


@post(
    ["/completions", "/v1/completions"],
    status_code=200,
    summary="Create a completion (OpenAI-compatible)",
    dependencies=_body(_reads_completion),
    response_headers=_HEADERS,
    **documented(*_LLM_ERRORS, also=_SSE),
)
async def completions(request: Request[Any, Any, Any]) -> Response[Completion]:
    return await _proxy("completions", request)


@post(
    ["/embeddings", "/v1/embeddings"],
    status_code=200,
    summary="Create embeddings (OpenAI-compatible)",
    dependencies=_body(_reads_embeddings),
    response_headers=_HEADERS,
    **documented(*_LLM_ERRORS),
)
async def embeddings(request: Request[Any, Any, Any]) -> Response[Embeddings]:
    return await _proxy("embeddings", request)


@get(
    ["/models", "/v1/models"],
    dependencies=_dependencies,
    summary="Models this key may use",
    **documented(401, 503),
)
async def list_models(request: Request[Any, Any, Any], caller: Caller) -> Response[ModelList]:
    names = [name for name in services_of(request).router.model_names if caller.allows_model(name)]
    data = [
        {"id": name, "object": "model", "created": _MODEL_CREATED, "owned_by": "spendledger"}
        for name in names
    ]
    return json_response({"object": "list", "data": data})


route_handlers = [chat_completions, completions, embeddings, list_models]
