--[[
  attach_payment: tie a payment intent to an order (first one wins), for the live view and,
  through the outbox, the ledger. The hold moves from the index of holds without an intent to
  the index of holds with one, so the expiry job cancels the intent before ending the hold and
  never has to look up which holds have one.

  KEYS[1] order hash   KEYS[2] outbox
  KEYS[3] holds (zset: live holds without an intent, by expiry ms)
  KEYS[4] intent holds (zset: live holds with an intent, by expiry ms)
  ARGV[1] payment intent id   ARGV[2] client secret   ARGV[3] amount (minor units)
  ARGV[4] currency

  Returns {code, payment intent id, client secret}:
     1 OK             attached now
     3 ALREADY_FINAL  an intent was already attached: returns that one, nothing written
   -11 ORDER_NOT_FOUND
   -13 INVALID_STATE  {-13, state}: the hold already ended; no secret is handed out for it
]]
local rcall = redis.call
--!include now.lua
--!include emit.lua

local order = rcall('HMGET', KEYS[1], 'id', 'pi', 'client_secret', 'version', 'state',
                    'expires_ms')
if not order[1] then
  return {-11}
end
if order[2] and order[2] ~= '' then
  return {3, order[2], order[3] or ''}
end
if order[5] ~= 'reserved' then
  return {-13, order[5]}
end
local now = now_ms()
rcall('HSET', KEYS[1], 'pi', ARGV[1], 'client_secret', ARGV[2], 'amount', ARGV[3],
      'currency', ARGV[4], 'version', tonumber(order[4]) + 1, 'updated_ms', now)
rcall('ZREM', KEYS[3], order[1])
rcall('ZADD', KEYS[4], order[6], order[1])
emit(KEYS[2], KEYS[1], now)
return {1, ARGV[1], ARGV[2]}
