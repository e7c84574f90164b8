"""JSON in and out with exact money: Decimal is written as a JSON number with its exact digits.

Litestar's own encoder writes Decimal as a string (msgspec's default) or a float (its hook): neither
is what a LiteLLM client expects, so JSON responses are encoded here and passed through as bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec
from litestar import Response

encoder: Final = msgspec.json.Encoder(decimal_format="number")


def sent_fields(data: msgspec.Struct, *leave_out: str) -> dict[str, Any]:
    """The fields an update request actually sent (UNSET ones, and `leave_out`, omitted), lists
    made tuples as the events hold them: "only the fields sent change"."""
    fields = {}
    for name in data.__struct_fields__:
        value = getattr(data, name)
        if name not in leave_out and value is not msgspec.UNSET:
            fields[name] = tuple(value) if isinstance(value, list) else value
    return fields


def json_response(
    content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response[Any]:
    return Response(
        content=encoder.encode(content),
        status_code=status_code,
        media_type="application/json",
        headers=dict(headers or {}),
    )
