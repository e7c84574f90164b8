"""Adversarial tests: one per way a hostile client (or receiver) tried to break the ledger (issue 15)."""
