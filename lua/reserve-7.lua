--[[
  reserve: take a hold on stock for one shopper, atomically, or change nothing.

  KEYS[1] sale hash         (definition; counters held, sold)
  KEYS[2] stock             (integer: units available)
  KEYS[3] users             (hash: user -> units in live holds + paid; 0 once they are gone)
  KEYS[4] holds             (zset: order id scored by expiry ms)
  KEYS[5] outbox            (stream: one entry per change, laid out as includes/emit.lua says)
  KEYS[6] order hash        (for the new order id ARGV[1])
  KEYS[7] idempotency       (string: first answer for user + Idempotency-Key)

  ARGV[1] new order id
  ARGV[2] user id
  ARGV[3] quantity (positive integer)
  ARGV[4] request fingerprint (same key + different fingerprint = reuse error)
  ARGV[5] idempotency record TTL, seconds
  ARGV[6] the Idempotency-Key itself (kept on the order for the ledger)

  Checks run in this order; the first that fails answers and NOTHING is written:
  sale exists, idempotency record (a replay answers first, whatever the sale does now),
  status open, start <= now < end, quantity <= per-order maximum, per-user limit, stock.

  Returns {code, ...}:
     1 OK        {1, order id, quantity, created ms, expires ms, stock left}
     2 REPLAYED  {2, order id, quantity, created ms, expires ms}
    -1 SALE_NOT_FOUND
    -2 SALE_NOT_STARTED  {-2, start ms}
    -3 SALE_ENDED        {-3, end ms}
    -4 SALE_PAUSED
    -5 INVALID_QUANTITY
    -6 QUANTITY_EXCEEDS_MAXIMUM {-6, per-order maximum}
    -7 IDEMPOTENCY_KEY_REUSED
    -8 LIMIT_EXCEEDED    {-8, limit, units the user already has}
    -9 SOLD_OUT          {-9, stock left}
   -10 ORDER_ID_TAKEN    (64 random bits collided; the caller retries with a new id)
]]
local rcall = redis.call
--!include emit.lua

local sale = rcall('HMGET', KEYS[1], 'status', 'start_ms', 'end_ms', 'per_order_max',
                   'per_user_limit', 'hold_ms')
if not sale[1] then
  return {-1}
end

-- The idempotency record and the stock in one call (each redis.call costs ~2-3 us of script
-- glue; reading the stock early changes nothing, it is only used after the other checks).
local record_and_stock = rcall('MGET', KEYS[7], KEYS[2])
local record = record_and_stock[1]
if record then
  local fingerprint, order_id, qty, created, expires =
    string.match(record, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  if fingerprint ~= ARGV[4] then
    return {-7}
  end
  return {2, order_id, tonumber(qty), tonumber(created), tonumber(expires)}
end

local t = rcall('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if sale[1] == 'closed' then
  return {-3, tonumber(sale[3])}
end
if sale[1] ~= 'open' then
  return {-4}
end
if now < tonumber(sale[2]) then
  return {-2, tonumber(sale[2])}
end
if now >= tonumber(sale[3]) then
  return {-3, tonumber(sale[3])}
end

local qty = tonumber(ARGV[3])
if not qty or qty < 1 or qty % 1 ~= 0 then
  return {-5}
end
local per_order_max = tonumber(sale[4])
if qty > per_order_max then
  return {-6, per_order_max}
end

local user = ARGV[2]
local has = tonumber(rcall('HGET', KEYS[3], user) or '0')
local limit = tonumber(sale[5])
if has + qty > limit then
  return {-8, limit, has}
end

local stock = tonumber(record_and_stock[2] or '0')
if stock < qty then
  return {-9, stock}
end

if rcall('EXISTS', KEYS[6]) == 1 then
  return {-10}
end

local order_id = ARGV[1]
local expires = now + tonumber(sale[6])
stock = rcall('DECRBY', KEYS[2], qty)
rcall('HINCRBY', KEYS[3], user, qty)
rcall('HINCRBY', KEYS[1], 'held', qty)
rcall('HSET', KEYS[6],
      'id', order_id, 'user', user, 'qty', qty, 'state', 'reserved', 'version', 1,
      'created_ms', now, 'expires_ms', expires, 'updated_ms', now, 'idem', ARGV[6])
rcall('ZADD', KEYS[4], expires, order_id)
rcall('SET', KEYS[7],
      ARGV[4] .. '|' .. order_id .. '|' .. qty .. '|' .. now .. '|' .. expires,
      'EX', tonumber(ARGV[5]))
append_change(KEYS[5], order_id, user, qty, 'reserved', 1, now, expires, now, '', '', '',
              ARGV[6])
return {1, order_id, qty, now, expires, stock}
