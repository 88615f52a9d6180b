-- now_ms(): Redis's own clock in milliseconds; scripts never trust a caller's clock.
local function now_ms()
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
