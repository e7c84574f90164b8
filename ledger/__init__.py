"""The write side of spendledger: events, money, pricing, the store. Knows nothing of HTTP."""
