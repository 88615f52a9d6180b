-- orders_by_sale_state (sale_id, state) indexed almost nothing: every order of a sale shares the
-- sale id, and nearly all share a state. Every query by sale (count_orders, ledger_orders,
-- reconcile) is served by orders_by_sale_user (sale_id, user_id) through its sale_id prefix.
-- Keeping it cost each ledger write ~1 µs of Postgres CPU per order (~4-7 %, 15 paired rounds of
-- 30,000 version-1 orders in batches of 1,000) and 81 of 867 bytes of WAL per order.
DROP INDEX orders_by_sale_state;
