"""SQL tested at its own boundary: the functions of ledger/sql against a real PostgreSQL."""
