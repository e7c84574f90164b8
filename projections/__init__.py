"""The read side: tables derived from the event log, and the queries that read them."""
