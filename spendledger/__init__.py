"""spendledger: an OpenAI-compatible LLM gateway whose billing is an event-sourced ledger in PostgreSQL.

The one installed top-level name. In the repository, `api/`, `ledger/`, `projections/` and `alembic/`
are the design's top-level folders; this package holds them by symlink (`spendledger.api`,
`spendledger.ledger`, `spendledger.projections`, and the migrations as `spendledger/migrations`), so
that the code imports the same names from a checkout and from an installed wheel, and nothing
installed is named `api`, `ledger` or `alembic`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spendledger")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
