"""flashsale: a flash-sale engine. Holds live in Redis, the ledger in Postgres."""

__version__ = "0.1.0"
