-- The admin lists page through these in order: a page costs the rows it shows, not the table.
-- Orders of one shopper across sales, by id (orders of a sale are contiguous in the primary key:
-- their ids start with the sale's).
CREATE INDEX orders_by_user ON orders (user_id, id);
-- Stored Stripe events, newest first.
CREATE INDEX webhook_events_by_time ON webhook_events (received_at, id);
