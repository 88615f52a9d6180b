-- Events for subscribers (Standard Webhooks): who subscribes, what happened, and each delivery
-- of an event to a subscription with the attempts it took.

CREATE TABLE webhook_subscriptions (
    id                      text PRIMARY KEY,
    url                     text NOT NULL,
    event_types             text[] NOT NULL,
    description             text NOT NULL DEFAULT '',
    secret                  text NOT NULL,                 -- whsec_<base64 key>
    -- During a rotation the previous secret signs too, until it expires.
    previous_secret         text,
    previous_expires_at     timestamptz,
    enabled                 boolean NOT NULL DEFAULT true,
    disabled_reason         text,
    -- The first failed attempt since the last success: an endpoint failing for days is disabled.
    failing_since           timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

-- The id is made from what the event is about (an order's version, a sale's milestone), so a
-- change written twice by the drain produces its event once: ON CONFLICT DO NOTHING.
CREATE TABLE outbound_events (
    id          text PRIMARY KEY,
    type        text NOT NULL,
    sale_id     text NOT NULL,
    occurred_at timestamptz NOT NULL,
    data        jsonb NOT NULL
);

CREATE TABLE outbound_deliveries (
    subscription_id text NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    event_id        text NOT NULL REFERENCES outbound_events (id),
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    -- Pending: when the next attempt is due, or until when a worker holds the one it is making.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, event_id)
);
-- The delivery job reads only what is due, per subscription (its claim takes each endpoint's
-- earliest due ones): it never scans delivered or failed rows, nor another endpoint's backlog.
CREATE INDEX outbound_deliveries_due ON outbound_deliveries (subscription_id, next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX outbound_deliveries_by_subscription
    ON outbound_deliveries (subscription_id, created_at DESC);

CREATE TABLE outbound_attempts (
    subscription_id text NOT NULL,
    event_id        text NOT NULL,
    attempt         integer NOT NULL,
    at              timestamptz NOT NULL DEFAULT now(),
    status          integer,            -- the endpoint's HTTP status; NULL: no answer
    error           text,
    duration_ms     integer NOT NULL,
    PRIMARY KEY (subscription_id, event_id, attempt),
    FOREIGN KEY (subscription_id, event_id)
        REFERENCES outbound_deliveries (subscription_id, event_id) ON DELETE CASCADE
);
