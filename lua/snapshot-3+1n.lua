--[[
  snapshot: read-only; a sale's counters and the orders it is given, as of one instant. For
  audits (engine/invariants.py): counters and order hashes read by separate commands while
  orders flow come from different moments and disagree without anything being wrong; read in
  one script they must agree exactly.

  No key lists every order of a sale (the order path never needs one), so the caller names the
  orders it wants read: those the ledger has and those clients were answered 201 for.

  KEYS[1] sale hash   KEYS[2] stock   KEYS[3] outbox (stream)
  then for order i = 1..n (n may be 0):
  KEYS[3 + i] order hash

  No ARGV.

  Returns {code, ...}:
     1 OK  {1, available, held, sold, withdrawn, initial stock, outbox length,
            then for each order i: {id, state, version, quantity, user}, or false when Redis
            has no such order}
           The outbox length is the ledger's backlog: the drain deletes what it acknowledged.
    -1 SALE_NOT_FOUND
]]
local rcall = redis.call

local sale = rcall('HMGET', KEYS[1], 'held', 'sold', 'withdrawn', 'initial_stock')
if not sale[4] then
  return {-1}
end
local reply = {1, tonumber(rcall('GET', KEYS[2]) or '0'), tonumber(sale[1] or '0'),
               tonumber(sale[2] or '0'), tonumber(sale[3] or '0'), tonumber(sale[4]),
               rcall('XLEN', KEYS[3])}
for i = 4, #KEYS do
  local o = rcall('HMGET', KEYS[i], 'id', 'state', 'version', 'qty', 'user')
  if o[1] then
    reply[#reply + 1] = {o[1], o[2], tonumber(o[3]), tonumber(o[4]), o[5]}
  else
    reply[#reply + 1] = false
  end
end
return reply
