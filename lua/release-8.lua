--[[
  release: end a live hold (cancel, expire or fail) and give back its stock and the shopper's
  count exactly once, whatever number of times and in whatever order the callers arrive.

  KEYS[1] sale hash (counters held and payments_failed)   KEYS[2] stock   KEYS[3] users   KEYS[4] holds   KEYS[5] outbox
  KEYS[6] order hash  KEYS[7] voids (zset: cancelled orders whose PaymentIntent a worker must
                               cancel at the gateway, so the shopper cannot still pay it; by
                               when the cancel is due)
  KEYS[8] intent holds (zset: live holds with a payment intent, by expiry)

  ARGV[1] order id
  ARGV[2] new state: 'cancelled' | 'expired' | 'failed'
  ARGV[3] owner user id to check, or '' to skip the check (workers)
  ARGV[4] '1': the gateway failed this hold's payment (counted in payments_failed); optional

  Returns {code, state, version}:
     1 OK             the hold ended now; state is ARGV[2]
     3 ALREADY_FINAL  the order had already left 'reserved'; its state is returned, nothing written
   -11 ORDER_NOT_FOUND  (also when ARGV[3] names someone else: do not reveal others' orders)
   -12 NOT_DUE        'expired' asked before the hold's expiry; nothing written
   -13 INVALID_STATE  ARGV[2] is not a release state
]]
local rcall = redis.call
--!include now.lua
--!include emit.lua

local target = ARGV[2]
if target ~= 'cancelled' and target ~= 'expired' and target ~= 'failed' then
  return {-13}
end

local order = rcall('HMGET', KEYS[6], 'user', 'qty', 'state', 'expires_ms', 'version', 'pi')
if not order[1] or (ARGV[3] ~= '' and order[1] ~= ARGV[3]) then
  return {-11}
end
if order[3] ~= 'reserved' then
  return {3, order[3], tonumber(order[5])}
end

local now = now_ms()
if target == 'expired' and now < tonumber(order[4]) then
  return {-12, order[3], tonumber(order[5])}
end

local user, qty = order[1], tonumber(order[2])
local version = tonumber(order[5]) + 1
rcall('INCRBY', KEYS[2], qty)
-- The shopper stays in users at 0: sold_out_view relies on nobody ever leaving it.
rcall('HINCRBY', KEYS[3], user, -qty)
rcall('HINCRBY', KEYS[1], 'held', -qty)
rcall('HSET', KEYS[6], 'state', target, 'version', version, 'updated_ms', now)
-- Payments the gateway failed, counted for the dashboard. Not every 'failed' release is one:
-- an intent cancelled at the gateway (by an operator, or a cancel whose answer was lost) ends
-- its hold as failed too.
if ARGV[4] == '1' then
  rcall('HINCRBY', KEYS[1], 'payments_failed', 1)
end
-- A live hold is in exactly one of the two indexes; removing from both needs no lookup.
rcall('ZREM', KEYS[4], ARGV[1])
rcall('ZREM', KEYS[8], ARGV[1])
-- An expired hold's intent was cancelled before the expiry; a failed one's by the webhook
-- receiver before the failure. Only a shopper's cancel leaves an intent to void.
if target == 'cancelled' and order[6] and order[6] ~= '' then
  rcall('ZADD', KEYS[7], now, ARGV[1])
end
-- The whole order, payment fields included, so the ledger's payments row follows too.
emit(KEYS[5], KEYS[6], now)
return {1, target, version}
