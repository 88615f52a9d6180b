--[[
  refund: move an order towards refunded.
  'request'  paid -> refund_pending: the units leave the shopper (and their count); with restock
             they go back to stock, otherwise they are counted as withdrawn (never resold).
  'complete' refund_pending -> refunded, once the gateway confirmed the refund.

  KEYS[1] sale hash   KEYS[2] stock   KEYS[3] users   KEYS[4] holds   KEYS[5] outbox
  KEYS[6] order hash  KEYS[7] refunds (zset: refund_pending order ids, by when the refund is due)

  ARGV[1] order id
  ARGV[2] 'request' | 'complete'
  ARGV[3] '1' to restock on request, '0' to withdraw the units
  ARGV[4] refund id at the gateway (complete only; '' otherwise)

  Returns {code, state, version}:
     1 OK
     3 ALREADY_FINAL   request on refund_pending/refunded, complete on refunded: nothing written
   -11 ORDER_NOT_FOUND
   -13 INVALID_STATE   the order is not paid (request) or not refund_pending (complete)
]]
local rcall = redis.call
--!include now.lua
--!include emit.lua

local order = rcall('HMGET', KEYS[6], 'user', 'qty', 'state', 'version')
if not order[1] then
  return {-11}
end
local user, qty, state, version = order[1], tonumber(order[2]), order[3], tonumber(order[4])
local now = now_ms()

if ARGV[2] == 'request' then
  if state == 'refund_pending' or state == 'refunded' then
    return {3, state, version}
  end
  if state ~= 'paid' then
    return {-13, state, version}
  end
  rcall('HINCRBY', KEYS[1], 'sold', -qty)
  -- The shopper stays in users at 0: sold_out_view relies on nobody ever leaving it.
  rcall('HINCRBY', KEYS[3], user, -qty)
  if ARGV[3] == '1' then
    rcall('INCRBY', KEYS[2], qty)
  else
    rcall('HINCRBY', KEYS[1], 'withdrawn', qty)
  end
  rcall('ZADD', KEYS[7], now, ARGV[1])
  state = 'refund_pending'
elseif ARGV[2] == 'complete' then
  if state == 'refunded' then
    return {3, state, version}
  end
  if state ~= 'refund_pending' then
    return {-13, state, version}
  end
  rcall('ZREM', KEYS[7], ARGV[1])
  rcall('HSET', KEYS[6], 'refund', ARGV[4])
  state = 'refunded'
else
  return {-13, state, version}
end
version = version + 1
rcall('HSET', KEYS[6], 'state', state, 'version', version, 'updated_ms', now)
emit(KEYS[5], KEYS[6], now)
return {1, state, version}
