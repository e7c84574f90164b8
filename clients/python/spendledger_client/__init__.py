"""Report LLM calls made outside the spendledger gateway to its ledger (POST /usage), and ask for a
hold before making one (POST /usage/admit).

    from spendledger_client import SpendLedger

    with SpendLedger("https://gateway.example/", "sk-...", spool_path="/var/lib/app/usage.spool") as ledger:
        ledger.record(model="gpt-4o", usage=response.usage, user="customer-42")

Integrations, each importing its SDK only when imported: `spendledger_client.litellm`
(`SpendledgerCallback`) and `spendledger_client.openai` (`wrap_openai`).
"""

from .aclient import AsyncCallScope, AsyncSpendLedger
from .calls import Call, RecordFields
from .client import CallScope, SpendLedger
from .errors import (
    APIError,
    BudgetExceeded,
    CustomerBlocked,
    DeliveryDeferred,
    ErrorInfo,
    RateLimited,
    Refused,
    SpendLedgerError,
    SpoolLocked,
    Unreachable,
)
from .records import Hold, Result, WireRecord, normalize_usage

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AsyncCallScope",
    "AsyncSpendLedger",
    "BudgetExceeded",
    "Call",
    "CallScope",
    "CustomerBlocked",
    "DeliveryDeferred",
    "ErrorInfo",
    "Hold",
    "RateLimited",
    "RecordFields",
    "Refused",
    "Result",
    "SpendLedger",
    "SpendLedgerError",
    "SpoolLocked",
    "Unreachable",
    "WireRecord",
    "normalize_usage",
]
