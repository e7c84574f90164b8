"""JSON request bodies, bounded in depth: a body nested deeper than any request needs is a 400.

msgspec decodes recursively: a body nested ~1,000 deep raised RecursionError inside Litestar's
`Request.json()`, which reached the catch-all handler as a 500. Bodies that decode but nest
hundreds deep are refused too: they would be stored (key, team and user `metadata` go into events
and jsonb) and every later read, re-encode or replay of them would walk the same depth.
"""

from __future__ import annotations

from typing import Any, Final

from litestar import Request

from spendledger.api.errors import bad_request

# Far deeper than any management request or LiteLLM `metadata` needs; far from the stack's limit.
MAX_JSON_DEPTH: Final = 64


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and arrays in `value` nest more than `limit` levels (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _too_deep() -> Exception:
    return bad_request(f"The JSON body nests objects and arrays more than {MAX_JSON_DEPTH} levels deep")


class BoundedJsonRequest(Request[Any, Any, Any]):
    """The app's request class: `json()` (what Litestar decodes `data` bodies with) refuses bodies
    nested too deeply, whether msgspec runs out of stack on them or not."""

    async def json(self) -> Any:
        try:
            value = await super().json()
        except RecursionError:
            raise _too_deep() from None
        if nested_deeper_than(value, MAX_JSON_DEPTH):
            raise _too_deep()
        return value
