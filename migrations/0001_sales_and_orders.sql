-- Sales as the operator defined them, and orders as the outbox last reported them.

CREATE TABLE sales (
    id             text PRIMARY KEY,
    name           text NOT NULL,
    stock          integer NOT NULL CHECK (stock >= 0),
    price          bigint NOT NULL CHECK (price >= 0),        -- minor units (cents)
    currency       text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    per_user_limit integer NOT NULL CHECK (per_user_limit > 0),
    per_order_max  integer NOT NULL CHECK (per_order_max > 0),
    hold_seconds   integer NOT NULL CHECK (hold_seconds > 0),
    starts_at      timestamptz NOT NULL,
    ends_at        timestamptz NOT NULL,
    status         text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'paused', 'closed')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);

CREATE TABLE orders (
    id              text PRIMARY KEY,
    sale_id         text NOT NULL REFERENCES sales (id),
    user_id         text NOT NULL,
    quantity        integer NOT NULL CHECK (quantity > 0),
    state           text NOT NULL
                    CHECK (state IN ('reserved', 'paid', 'expired', 'cancelled', 'failed',
                                     'refund_pending', 'refunded')),
    version         bigint NOT NULL CHECK (version > 0),
    idempotency_key text,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX orders_by_sale_state ON orders (sale_id, state);
CREATE INDEX orders_by_sale_user ON orders (sale_id, user_id);

-- The drain's upsert already refuses older versions; this makes it a property of the table,
-- so no future code path (a repair, a hand-written UPDATE) can move an order backwards.
CREATE FUNCTION orders_version_only_grows() RETURNS trigger AS $$
BEGIN
    IF NEW.version < OLD.version THEN
        RAISE EXCEPTION 'order % version would go from % back to %', OLD.id, OLD.version,
            NEW.version USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER orders_version_only_grows BEFORE UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_version_only_grows();

-- Every state an order went through, with when; (order, version) makes replays harmless.
CREATE TABLE order_events (
    order_id text NOT NULL,
    version  bigint NOT NULL,
    state    text NOT NULL,
    at       timestamptz NOT NULL,
    PRIMARY KEY (order_id, version)
);
