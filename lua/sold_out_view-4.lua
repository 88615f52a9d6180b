--[[
  sold_out_view: what a server process needs to answer "sold out" on its own, read in one call.
  Read-only. A server calls it after `reserve` answered SOLD_OUT with no stock left, and then
  every few tens of milliseconds while it keeps answering that sale itself.

  KEYS[1] sale hash   KEYS[2] stock   KEYS[3] users (hash: user -> units; a shopper who ever
                                                     held a unit of the sale stays listed, at 0)
  KEYS[4] outbox (stream)
  ARGV[1] the fingerprint the caller got with its last list of shoppers, or ''
  ARGV[2] the most shoppers the caller will take a list of

  The fingerprint is the outbox's last generated id. Every script that adds a shopper to users
  (reserve, confirm re-reserving) appends to the outbox in the same call, and stream ids only
  grow, also after a restart that lost the last writes: an unchanged id means an unchanged list.

  Returns {code, ...}:
     1 OK  {1, now ms, end ms, per-order maximum, per-user limit, shoppers, fingerprint,
            names or false}
           The sale is open, inside its window, has no stock at all, and is marked buyers_kept
           (every shopper who ever held a unit stays in users; load_sale sets it). `names` lists every shopper
           in users, or is false when the fingerprint is ARGV[1]'s.
    -1 SALE_NOT_FOUND
    -9 SOLD_OUT {-9, stock}: not for the caller to answer by itself: stock is back, or the sale
       is not open, not inside its window, not buyers_kept, or more than ARGV[2] shoppers ever
       held a unit (the caller forgets the sale and asks `reserve` again).
]]
local rcall = redis.call

local sale = rcall('HMGET', KEYS[1], 'status', 'start_ms', 'end_ms', 'per_order_max',
                   'per_user_limit', 'buyers_kept')
if not sale[1] then
  return {-1}
end
local stock = tonumber(rcall('GET', KEYS[2]) or '0')
local t = rcall('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if stock > 0 or sale[1] ~= 'open' or now < tonumber(sale[2]) or now >= tonumber(sale[3])
    or sale[6] ~= '1' then
  return {-9, stock}
end

local shoppers = rcall('HLEN', KEYS[3])
if shoppers > tonumber(ARGV[2]) then
  return {-9, stock}
end
local fingerprint = '0-0'
local info = rcall('XINFO', 'STREAM', KEYS[4])
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then
    fingerprint = info[i + 1]
  end
end
local names = false
if fingerprint ~= ARGV[1] then
  names = rcall('HKEYS', KEYS[3])
end
return {1, now, tonumber(sale[3]), tonumber(sale[4]), tonumber(sale[5]), shoppers, fingerprint,
        names}
