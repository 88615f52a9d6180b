-- Payments (one row per payment intent) and every Stripe webhook event, stored by its id.

ALTER TABLE orders ADD COLUMN payment_intent_id text;
CREATE INDEX orders_by_intent ON orders (payment_intent_id) WHERE payment_intent_id IS NOT NULL;

CREATE TABLE payments (
    intent_id     text PRIMARY KEY,
    order_id      text NOT NULL,
    amount        bigint NOT NULL CHECK (amount >= 0),        -- minor units
    currency      text NOT NULL,
    order_state   text NOT NULL,      -- the order's state when this row was last written
    order_version bigint NOT NULL,    -- only grows, like orders.version
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL
);
CREATE INDEX payments_by_order ON payments (order_id);

CREATE TABLE webhook_events (
    id           text PRIMARY KEY,                 -- Stripe's event id: duplicates stop here
    type         text NOT NULL,
    created_at   timestamptz NOT NULL,             -- Stripe's creation time of the event
    order_id     text,
    intent_id    text,
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,                      -- NULL: not applied yet, a worker retries
    outcome      text
);
CREATE INDEX webhook_events_unprocessed ON webhook_events (received_at) WHERE processed_at IS NULL;
