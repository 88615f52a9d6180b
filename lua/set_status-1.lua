--[[
  set_status: open, pause or close a loaded sale.

  KEYS[1] sale hash
  ARGV[1] 'open' | 'paused' | 'closed'

  Returns {code, previous status}:
     1 OK
   -1 SALE_NOT_FOUND
  -13 INVALID_STATE   (unknown status, or reopening a closed sale)
]]
local rcall = redis.call
local status = ARGV[1]
if status ~= 'open' and status ~= 'paused' and status ~= 'closed' then
  return {-13}
end
local previous = rcall('HGET', KEYS[1], 'status')
if not previous then
  return {-1}
end
if previous == 'closed' and status ~= 'closed' then
  return {-13, previous}
end
rcall('HSET', KEYS[1], 'status', status)
return {1, previous}
