"""Ids that clients choose (customers, users, teams, budgets, key aliases): what the ledger accepts.

An id travels far from the request that named it: into primary keys and btree indexes (whose rows
hold at most ~2,700 bytes), into outbox dedupe keys, and from there into HTTP headers
(`webhook-id`), where a CR or LF would split the header. So an id is refused at the edge unless it
is 1 to `ID_MAX_LENGTH` characters, not only whitespace, with no control characters.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

from msgspec import Meta

ID_MAX_LENGTH: Final = 256
# Any character but the C0 controls and DEL, and at least one that is not whitespace.
ID_PATTERN: Final = r"^(?=.*\S)[^\x00-\x1f\x7f]+$"
_ID: Final = re.compile(ID_PATTERN, re.DOTALL)
ID_RULE: Final = f"1 to {ID_MAX_LENGTH} characters, not only whitespace, with no control characters"

# For msgspec Structs (request bodies): a violation is a ValidationError naming the field.
Identifier = Annotated[
    str, Meta(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN, description=f"An id: {ID_RULE}")
]


def is_identifier(value: str) -> bool:
    """The same rule as `Identifier`, for values that do not come through a Struct (headers)."""
    return len(value) <= ID_MAX_LENGTH and _ID.match(value) is not None


TEXT_MAX_LENGTH: Final = 1024
# Free text that names something for people (aliases, emails, regions): not an id, so any
# characters, but bounded — it is stored in rows and events and echoed in every answer about it.
FreeText = Annotated[
    str, Meta(max_length=TEXT_MAX_LENGTH, description=f"Free text, at most {TEXT_MAX_LENGTH} characters")
]
