--[[
  amend_sale: change a sale's window or terms before it starts. Once the first shopper could
  have ordered, the terms they ordered under stay as they were.

  KEYS[1] sale hash

  ARGV[1..] field, value, field, value ... (any of start_ms, end_ms, price, per_user_limit,
            per_order_max, hold_ms, name, stock_low_units; checked by the caller,
            engine/http/adminsales.py)

  Returns:
     1 OK               {1}
    -1 SALE_NOT_FOUND   {-1}
   -13 INVALID_STATE    {-13, status}      the sale is closed
   -13 INVALID_STATE    {-13, 'started'}   its start has come (Redis's clock)
]]
local rcall = redis.call
--!include now.lua

local sale = rcall('HMGET', KEYS[1], 'status', 'start_ms')
if not sale[1] then
  return {-1}
end
if sale[1] == 'closed' then
  return {-13, sale[1]}
end
if now_ms() >= tonumber(sale[2]) then
  return {-13, 'started'}
end
rcall('HSET', KEYS[1], unpack(ARGV))
return {1}
