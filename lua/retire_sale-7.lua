--[[
  retire_sale: take a sale that is over and has nothing left to do off the live set, the list
  every worker job walks every tick. Whatever gives it work again (a late payment, a refund, a
  restock) puts it back (SADD after its own script), so a check here and such a change can
  never both miss each other: this script sees the change's work, or the change comes after.

  KEYS[1] sale hash
  KEYS[2] holds (sorted set)
  KEYS[3] intent holds (sorted set)
  KEYS[4] refunds (sorted set)
  KEYS[5] voids (sorted set)
  KEYS[6] outbox (stream)
  KEYS[7] live sales (set; one for the deployment, no hash tag)
  ARGV[1] sale id
  ARGV[2] grace (ms): a sale stays live this long after its end (late webhooks, reconcile)

  Returns {code}:
     1 OK              retired
    -1 SALE_NOT_FOUND
   -12 NOT_DUE         not yet past its end plus the grace
   -13 INVALID_STATE   work left: holds, refunds or intent cancels owed, unwritten changes
]]
local rcall = redis.call
local end_ms = rcall('HGET', KEYS[1], 'end_ms')
if not end_ms then
  return {-1}
end
local t = rcall('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now_ms < tonumber(end_ms) + tonumber(ARGV[2]) then
  return {-12}
end
for i = 2, 5 do
  if rcall('ZCARD', KEYS[i]) > 0 then
    return {-13}
  end
end
if rcall('XLEN', KEYS[6]) > 0 then
  return {-13}
end
rcall('SREM', KEYS[7], ARGV[1])
return {1}
