"""Query parameters that are ids: the ledger's id rule (ledger/identifiers.py), checked by Litestar.

Request bodies get the rule from the `Identifier` type of their Struct fields. Litestar drops the
constraints of an `Annotated` type on a query parameter and checks only those of its `Parameter`,
so query ids take one of these (module-level, so that they are no call in an argument default):

    end_user_id: str = ID_PARAM
    user_id: str | None = OPTIONAL_ID_PARAM
"""

from __future__ import annotations

from typing import Any, Final

from litestar.params import Parameter

from spendledger.ledger.identifiers import ID_MAX_LENGTH, ID_PATTERN, ID_RULE

_ID_CONSTRAINTS: Final[dict[str, Any]] = {
    "min_length": 1,
    "max_length": ID_MAX_LENGTH,
    "pattern": ID_PATTERN,
    "description": f"An id: {ID_RULE}",
}

ID_PARAM: Final[Any] = Parameter(**_ID_CONSTRAINTS)
OPTIONAL_ID_PARAM: Final[Any] = Parameter(default=None, **_ID_CONSTRAINTS)
