"""arq workers: drain outboxes into the Postgres ledger and expire unpaid holds."""
