--[[
  load_sale: put a sale's definition into Redis. Loading again updates the definition but never
  the live counters (stock, held, sold, withdrawn) nor its status and window (those change only
  through set_status), so a re-run of `flashsale sale create` cannot reopen or move a sale.

  KEYS[1] sale hash   KEYS[2] stock   KEYS[3] outbox

  ARGV[1] outbox consumer group name
  ARGV[2] initial stock
  ARGV[3..] field, value, field, value ... (id, status, start_ms, end_ms, price, currency,
            per_user_limit, per_order_max, hold_ms, name)

  A first load also sets buyers_kept = 1: this version's scripts never remove a shopper from the
  users hash, so sold_out_view may trust it to list every past buyer (a sale first loaded by an
  older version may have lost some, and is never answered from memory).

  Returns {code}:
     1 LOADED    first load: stock set, counters zeroed, consumer group created
     4 UPDATED   already loaded: definition fields replaced, counters untouched
]]
local rcall = redis.call

local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end

if rcall('EXISTS', KEYS[1]) == 1 then
  local keep = {status = true, start_ms = true, end_ms = true}
  local update = {}
  for i = 1, #fields, 2 do
    if not keep[fields[i]] then
      update[#update + 1] = fields[i]
      update[#update + 1] = fields[i + 1]
    end
  end
  rcall('HSET', KEYS[1], unpack(update))
  return {4}
end

rcall('HSET', KEYS[1], 'initial_stock', ARGV[2], 'held', 0, 'sold', 0, 'buyers_kept', 1,
      unpack(fields))
rcall('SET', KEYS[2], ARGV[2])
-- Group from id 0 so not one entry written before the first worker starts is skipped.
pcall(rcall, 'XGROUP', 'CREATE', KEYS[3], ARGV[1], '0', 'MKSTREAM')
return {1}
