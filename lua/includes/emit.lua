-- An outbox entry carries the order's whole state after a change, its values joined by byte 31
-- (ASCII unit separator), in this order:
--    1 order id   2 user id   3 quantity   4 state   5 version   6 created ms   7 expires ms
--    8 at ms (the change's time)   9 payment intent id   10 amount   11 currency
--   12 Idempotency-Key
-- ('' where the order has no such value yet). No validator (engine/ids.py), Stripe id, state or
-- number lets byte 31 or byte 30 in, and the Idempotency-Key, the most free-form value, goes
-- last. An entry has ONE field: 'change' (one change) or 'changes' (several, joined by byte 30,
-- ASCII record separator: a batch of reserve writes all its new orders as one entry; the drain's
-- Redis CPU per order, entries of 20 against entries of 1: 1-2.5 against 8-10 µs,
-- `python -m loadtests.costs`).
-- engine/ledger.py reads both (Postgres splits the values). One packed field instead of 12 pairs:
-- the drain worker's CPU per entry went from ~16 to ~4.6 µs and Redis's for the drain from ~8.2
-- to ~6.7 µs (30,000 entries, 5 alternating rounds); reserve's own cost did not move measurably.

-- pack_change(...): one change in that layout.
local function pack_change(order_id, user, qty, state, version, created, expires, at, intent,
                           amount, currency, idem)
  return order_id .. '\31' .. user .. '\31' .. qty .. '\31' .. state .. '\31' .. version ..
         '\31' .. created .. '\31' .. expires .. '\31' .. at .. '\31' .. intent .. '\31' ..
         amount .. '\31' .. currency .. '\31' .. idem
end

-- emit(outbox, order_key, now): append the order's whole current state to the sale's outbox.
-- Every script that changes an order calls this last, in the same atomic call as the change.
local function emit(outbox, order_key, now)
  local o = rcall('HMGET', order_key, 'id', 'user', 'qty', 'state', 'version', 'created_ms',
                  'expires_ms', 'idem', 'pi', 'amount', 'currency')
  rcall('XADD', outbox, '*', 'change',
        pack_change(o[1], o[2], o[3], o[4], o[5], o[6], o[7], now, o[9] or '', o[10] or '',
                    o[11] or '', o[8] or ''))
end
