-- emit(outbox, order_key, now): append the order's whole current state to the sale's outbox.
-- Every script that changes an order calls this last, in the same atomic call as the change.
local function emit(outbox, order_key, now)
  local o = rcall('HMGET', order_key, 'id', 'user', 'qty', 'state', 'version', 'created_ms',
                  'expires_ms', 'idem', 'pi', 'amount', 'currency')
  rcall('XADD', outbox, '*',
        'order', o[1], 'user', o[2], 'qty', o[3], 'state', o[4], 'version', o[5],
        'created_ms', o[6], 'expires_ms', o[7], 'at_ms', now, 'idem', o[8] or '',
        'pi', o[9] or '', 'amount', o[10] or '', 'currency', o[11] or '')
end
