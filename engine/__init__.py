"""flashsale: a flash-sale engine. Holds live in Redis, the ledger in Postgres."""

__all__ = ["__version__"]

__version__ = "0.1.0"
