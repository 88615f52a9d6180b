--[[
  reserve: take holds on stock for a batch of orders in one sale. Each order is decided exactly as
  if it came alone, the orders one after another in the order given; an order that is refused
  writes NOTHING. One order is a batch of one. A server coalesces the orders of one event-loop
  turn into one call (engine/http/coalescer.py): the sale's reads, the clock, the stock, the
  shoppers' counts, the hold index and the outbox entry are then read and written once per batch
  instead of once per order (12 redis.calls per order alone; 10 per batch + 2 per order
  together: the order hash and the idempotency record).

  KEYS[1] sale hash         (definition; counters held, sold)
  KEYS[2] stock             (integer: units available)
  KEYS[3] users             (hash: user -> units in live holds + paid; 0 once they are gone)
  KEYS[4] holds             (zset: live holds without a payment intent, by expiry ms)
  KEYS[5] outbox            (stream: ONE entry for all the orders this call placed, field
                             'changes', laid out as includes/emit.lua says)
  then for order i = 1..n:
  KEYS[4 + 2i] order hash   (for the new order id)
  KEYS[5 + 2i] idempotency  (string: first answer for user + Idempotency-Key)

  n is at most 1000 (an error reply, nothing written, above that).

  ARGV[1] idempotency record TTL, seconds
  then for order i = 1..n, five values from ARGV[5i - 3]:
    new order id, user id, quantity (positive integer),
    request fingerprint (same key + different fingerprint = reuse error),
    the Idempotency-Key itself (kept on the order for the ledger)

  Checks run in this order for each order; the first that fails answers for that order:
  sale exists, idempotency record (a replay answers first, whatever the sale does now),
  status open, start <= now < end, quantity <= per-order maximum, per-user limit, stock,
  order id free.

  Returns one reply per order, in the orders' order, each {code, ...}:
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
   -10 ORDER_ID_TAKEN    (64 random bits collided; the caller retries that order with a new id)
]]
local rcall = redis.call
--!include emit.lua

local n = (#KEYS - 5) / 2
-- Per-order lists are unpacked into single commands, 2 values per order, and Lua's C stack
-- holds ~8,000: refuse a batch that could fail half-way, before anything is written.
if n > 1000 then
  return redis.error_reply('reserve takes at most 1000 orders per call')
end
local replies = {}

local sale = rcall('HMGET', KEYS[1], 'status', 'start_ms', 'end_ms', 'per_order_max',
                   'per_user_limit', 'hold_ms')
if not sale[1] then
  for i = 1, n do
    replies[i] = {-1}
  end
  return replies
end

-- Every idempotency record and the stock in one call.
local mget = {KEYS[2]}
for i = 1, n do
  mget[i + 1] = KEYS[5 + 2 * i]
end
local read = rcall('MGET', unpack(mget))
local stock = tonumber(read[1] or '0')
-- Records by key, so a key repeated inside the batch sees the answer given earlier in it.
local records = {}
for i = 1, n do
  records[KEYS[5 + 2 * i]] = read[i + 1]
end

local t = rcall('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- The sale's own answer, the same for every order of the batch (nil: open and in its window).
local closed
if sale[1] == 'closed' then
  closed = {-3, tonumber(sale[3])}
elseif sale[1] ~= 'open' then
  closed = {-4}
elseif now < tonumber(sale[2]) then
  closed = {-2, tonumber(sale[2])}
elseif now >= tonumber(sale[3]) then
  closed = {-3, tonumber(sale[3])}
end
local per_order_max = tonumber(sale[4])
local limit = tonumber(sale[5])
-- Numbers as strings once per batch: Lua formats a number with sprintf each time it is
-- concatenated or passed to redis.call, ~13 times per order otherwise.
local now_s = tostring(now)
local expires, expires_s  -- on the first hold: replies and refusals never need them
local qty_s = {}

-- Read on first need: a batch of replays or refusals never reads them.
local has          -- user -> units, for every user of the batch
local taken_ids    -- order key -> true when that order exists or this batch created it

local taken = 0
local changes = {}
local users_changed = {}
local holds = {}

for i = 1, n do
  local a = 5 * i - 3
  local order_id, user, fingerprint, idem = ARGV[a], ARGV[a + 1], ARGV[a + 3], ARGV[a + 4]
  local order_key, idem_key = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  local qty = tonumber(ARGV[a + 2])
  local record = records[idem_key]
  if record then
    local first_fingerprint, first_id, first_qty, created, first_expires =
      string.match(record, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    if first_fingerprint ~= fingerprint then
      replies[i] = {-7}
    else
      replies[i] = {2, first_id, tonumber(first_qty), tonumber(created), tonumber(first_expires)}
    end
  elseif closed then
    replies[i] = closed
  elseif not qty or qty < 1 or qty % 1 ~= 0 then
    replies[i] = {-5}
  elseif qty > per_order_max then
    replies[i] = {-6, per_order_max}
  else
    if not has then
      local names = {}
      for j = 1, n do
        names[j] = ARGV[5 * j - 2]
      end
      local counts = rcall('HMGET', KEYS[3], unpack(names))
      has = {}
      for j = 1, n do
        has[names[j]] = tonumber(counts[j] or '0')
      end
    end
    if has[user] + qty > limit then
      replies[i] = {-8, limit, has[user]}
    elseif stock < qty then
      replies[i] = {-9, stock}
    else
      if not taken_ids then
        taken_ids = {}
        local order_keys = {}
        for j = 1, n do
          order_keys[j] = KEYS[4 + 2 * j]
        end
        -- One call for the batch; one per key only when some id collided (64 random bits).
        if rcall('EXISTS', unpack(order_keys)) > 0 then
          for j = 1, n do
            if rcall('EXISTS', order_keys[j]) == 1 then
              taken_ids[order_keys[j]] = true
            end
          end
        end
      end
      if taken_ids[order_key] then
        replies[i] = {-10}
      else
        if not expires then
          expires = now + tonumber(sale[6])
          expires_s = tostring(expires)
        end
        -- An id drawn twice inside the batch is taken by its first order.
        taken_ids[order_key] = true
        stock = stock - qty
        taken = taken + qty
        has[user] = has[user] + qty
        users_changed[user] = true
        holds[#holds + 1] = expires_s
        holds[#holds + 1] = order_id
        local q = qty_s[qty]
        if not q then
          q = tostring(qty)
          qty_s[qty] = q
        end
        rcall('HSET', order_key,
              'id', order_id, 'user', user, 'qty', q, 'state', 'reserved', 'version', '1',
              'created_ms', now_s, 'expires_ms', expires_s, 'updated_ms', now_s, 'idem', idem)
        local answer = fingerprint .. '|' .. order_id .. '|' .. q .. '|' .. now_s .. '|' .. expires_s
        records[idem_key] = answer
        rcall('SET', idem_key, answer, 'EX', ARGV[1])
        changes[#changes + 1] = pack_change(order_id, user, q, 'reserved', '1', now_s, expires_s,
                                            now_s, '', '', '', idem)
        replies[i] = {1, order_id, qty, now, expires, stock}
      end
    end
  end
end

if taken > 0 then
  rcall('DECRBY', KEYS[2], taken)
  rcall('HINCRBY', KEYS[1], 'held', taken)
  local counts = {}
  for user in pairs(users_changed) do
    counts[#counts + 1] = user
    counts[#counts + 1] = has[user]
  end
  rcall('HSET', KEYS[3], unpack(counts))
  rcall('ZADD', KEYS[4], unpack(holds))
  -- One entry for the batch: the drain reads, acknowledges and deletes it once, not per order.
  rcall('XADD', KEYS[5], '*', 'changes', table.concat(changes, '\30'))
end
return replies
