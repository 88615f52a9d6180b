--[[
  confirm: a payment succeeded at the gateway. Make the order paid, or, when the money arrives
  for a hold that already ended, re-reserve the units if stock and the shopper's limit allow,
  and otherwise mark the order refund_pending so a worker refunds it. Money is never kept for
  units the shopper does not get.

  KEYS[1] sale hash   KEYS[2] stock   KEYS[3] users   KEYS[4] holds   KEYS[5] outbox
  KEYS[6] order hash  KEYS[7] refunds (zset: refund_pending order ids, by when the refund is due)
  KEYS[8] intent holds (zset: live holds with a payment intent, by expiry)

  ARGV[1] order id
  ARGV[2] payment intent id that succeeded
  ARGV[3] the event's creation time, ms (0 when not from an event): an event older than the
          last payment event applied to this order changes nothing

  Returns {code, state, version}:
     1 OK              reserved -> paid
     6 RE_RESERVED     expired/cancelled/failed -> paid, units taken again from stock
     7 REFUND_PENDING  expired/cancelled/failed -> refund_pending (no stock, or over the limit)
     3 ALREADY_FINAL   already paid / refund_pending / refunded: nothing written
     5 STALE           an older event than one already applied: nothing written
   -11 ORDER_NOT_FOUND
   -14 PAYMENT_MISMATCH  the order is tied to another payment intent: nothing written
]]
local rcall = redis.call
--!include now.lua
--!include emit.lua

local order = rcall('HMGET', KEYS[6], 'user', 'qty', 'state', 'version', 'pi', 'pay_event_ms')
if not order[1] then
  return {-11}
end
local state, version = order[3], tonumber(order[4])
if order[5] and order[5] ~= '' and order[5] ~= ARGV[2] then
  return {-14, state, version}
end
local event_ms = tonumber(ARGV[3])
if event_ms > 0 and event_ms < tonumber(order[6] or '0') then
  return {5, state, version}
end
if state == 'paid' or state == 'refund_pending' or state == 'refunded' then
  return {3, state, version}
end

local now = now_ms()
local user, qty = order[1], tonumber(order[2])
local code, target
if state == 'reserved' then
  rcall('HINCRBY', KEYS[1], 'held', -qty)
  rcall('HINCRBY', KEYS[1], 'sold', qty)
  -- A live hold is in exactly one of the two indexes; removing from both needs no lookup.
  rcall('ZREM', KEYS[4], ARGV[1])
  rcall('ZREM', KEYS[8], ARGV[1])
  code, target = 1, 'paid'
else
  -- The hold ended (expired, cancelled, failed) and its units went back to stock.
  local limit = tonumber(rcall('HGET', KEYS[1], 'per_user_limit'))
  local has = tonumber(rcall('HGET', KEYS[3], user) or '0')
  local stock = tonumber(rcall('GET', KEYS[2]) or '0')
  if stock >= qty and has + qty <= limit then
    rcall('DECRBY', KEYS[2], qty)
    rcall('HINCRBY', KEYS[3], user, qty)
    rcall('HINCRBY', KEYS[1], 'sold', qty)
    code, target = 6, 'paid'
  else
    rcall('ZADD', KEYS[7], now, ARGV[1])
    code, target = 7, 'refund_pending'
  end
end
version = version + 1
local fields = {'state', target, 'version', version, 'updated_ms', now, 'pi', ARGV[2]}
if event_ms > 0 then
  fields[#fields + 1] = 'pay_event_ms'
  fields[#fields + 1] = event_ms
end
rcall('HSET', KEYS[6], unpack(fields))
emit(KEYS[5], KEYS[6], now)
return {code, target, version}
