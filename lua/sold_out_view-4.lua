--[[
  sold_out_view: what a server process needs to answer "sold out" on its own, read in one call.
  Read-only. A server calls it after `reserve` answered SOLD_OUT with no stock left, and then
  every few tens of milliseconds while it keeps answering that sale itself.

  KEYS[1] sale hash   KEYS[2] stock   KEYS[3] users (hash: user -> units; a shopper who ever
                                                     held a unit of the sale stays listed, at 0)
  ARGV[1] how many shoppers the caller already knows (HLEN of users it last saw), or -1
  ARGV[2] the most shoppers the caller will take a list of

  Returns {code, ...}:
     1 OK  {1, now ms, end ms, per-order maximum, per-user limit, shoppers, names or false}
           The sale is open, inside its window, and has no stock at all. `names` lists every
           shopper in users, unless there are exactly ARGV[1] of them: no script ever removes a
           shopper from users, so the same count means the same shoppers.
    -1 SALE_NOT_FOUND
    -9 SOLD_OUT {-9, stock}: not for the caller to answer by itself: stock is back, or the sale
       is not open or not inside its window, or more than ARGV[2] shoppers ever held a unit
       (the caller forgets the sale and asks `reserve` again).
]]
local rcall = redis.call

local sale = rcall('HMGET', KEYS[1], 'status', 'start_ms', 'end_ms', 'per_order_max',
                   'per_user_limit')
if not sale[1] then
  return {-1}
end
local stock = tonumber(rcall('GET', KEYS[2]) or '0')
local t = rcall('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if stock > 0 or sale[1] ~= 'open' or now < tonumber(sale[2]) or now >= tonumber(sale[3]) then
  return {-9, stock}
end

local shoppers = rcall('HLEN', KEYS[3])
if shoppers > tonumber(ARGV[2]) then
  return {-9, stock}
end
local names = false
if shoppers ~= tonumber(ARGV[1]) then
  names = rcall('HKEYS', KEYS[3])
end
return {1, now, tonumber(sale[3]), tonumber(sale[4]), tonumber(sale[5]), shoppers, names}
