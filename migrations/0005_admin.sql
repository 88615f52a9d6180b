-- Operators: scoped API keys, the audit of every admin action, and restocks of running sales.

CREATE TABLE api_keys (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL,
    prefix       text NOT NULL,                -- the key's first characters, to recognise it
    hash         bytea NOT NULL UNIQUE,        -- SHA-256 of the whole key (engine/apikeys.py)
    scopes       text[] NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,                  -- NULL: never
    revoked_at   timestamptz,
    last_used_at timestamptz                   -- at most a minute behind the last request
);

CREATE TABLE audit (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,                     -- 'key:ID', 'user:SUB' or 'admin-token'
    action  text NOT NULL,                     -- the route's operation, e.g. 'sale.restock'
    target  text,                              -- the sale, order or event acted on
    outcome text NOT NULL,                     -- 'ok' or the problem code answered
    detail  jsonb
);
CREATE INDEX audit_by_time ON audit (at);

-- One row per restock entry of a sale's outbox; the entry id makes a replayed drain harmless.
CREATE TABLE sale_restocks (
    sale_id  text NOT NULL REFERENCES sales (id),
    entry_id text NOT NULL,
    units    integer NOT NULL CHECK (units > 0),
    actor    text NOT NULL,
    at       timestamptz NOT NULL,
    PRIMARY KEY (sale_id, entry_id)
);
