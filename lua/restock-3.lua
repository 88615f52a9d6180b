--[[
  restock: add units to a loaded sale that is not closed, and record it in the sale's outbox in
  the same call, so the ledger learns of every unit that went on sale.

  initial_stock grows by the same units as stock, so available + held + sold + withdrawn =
  initial_stock still holds (engine/invariants.py); restocked counts all units ever added.

  KEYS[1] sale hash   KEYS[2] stock   KEYS[3] outbox

  ARGV[1] units to add (a positive integer)
  ARGV[2] who restocks (the audit's actor), carried into the ledger

  The outbox entry has one field, 'restock': units, Redis time (ms), actor and the units
  available after it, joined by byte 31 (engine/restock.py reads it).

  Returns:
     1 OK               {1, available after, initial_stock after}
    -1 SALE_NOT_FOUND   {-1}
    -5 INVALID_QUANTITY {-5}
   -13 INVALID_STATE    {-13, status}   the sale is closed
]]
local rcall = redis.call
--!include now.lua

local units = tonumber(ARGV[1])
if not units or units < 1 or units ~= math.floor(units) then
  return {-5}
end
local status = rcall('HGET', KEYS[1], 'status')
if not status then
  return {-1}
end
if status == 'closed' then
  return {-13, status}
end
local available = rcall('INCRBY', KEYS[2], units)
local initial = rcall('HINCRBY', KEYS[1], 'initial_stock', units)
rcall('HINCRBY', KEYS[1], 'restocked', units)
rcall('XADD', KEYS[3], '*', 'restock',
      units .. '\31' .. now_ms() .. '\31' .. ARGV[2] .. '\31' .. available)
return {1, available, initial}
