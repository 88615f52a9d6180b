"""arq workers: drain outboxes into the Postgres ledger, expire unpaid holds, make and refund
payments, retry stored webhooks and reconcile; ``workers.settings`` lists the jobs."""
