"""Domain exceptions. The API maps each kind to an HTTP status; the ledger never speaks HTTP."""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every refusal the ledger explains to its caller."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidCommand(LedgerError):
    """The command's input breaks a rule (negative budget, bad duration, unknown id …)."""


class NotFound(LedgerError):
    """The thing the command names does not exist (or no longer does)."""


class AlreadyExists(LedgerError):
    """A create command for an id or alias that is taken."""
