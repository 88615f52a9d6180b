--[[
  gateway_rate: one rate limit for every call to the payment gateway, shared by every server and
  worker process of the deployment. GCRA: the key holds the theoretical arrival time (TAT) of
  the next call; a caller takes the next free slot and waits until it comes, or is refused when
  that is further away than it will wait, and then nothing is written.

  KEYS[1] the limiter (string: TAT, µs on Redis's clock; expires once it lies in the past)

  ARGV[1] interval between calls, µs (1,000,000 / calls per second)
  ARGV[2] burst: calls that may start at once after a quiet spell (>= 1)
  ARGV[3] cost: slots to take (1 per call; 0 with ARGV[5] to only push the next slot back)
  ARGV[4] the longest wait the caller accepts, µs; -1 takes the slots whatever the wait
  ARGV[5] optional, µs: no call may start sooner than this from now. The gateway saying "slow
          down, retry after R" sets it to R, so every caller backs off together; several
          callers told so at once push the next slot to now + R once, not R each.

  Returns {code, wait µs}:
     1 OK            the slots are taken: call the gateway after waiting this long
   -15 RATE_LIMITED  the wait would be longer than ARGV[4]: nothing taken; this is the wait
]]
local rcall = redis.call
local t = rcall('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])

local tat = tonumber(rcall('GET', KEYS[1]) or '0')
if tat < now then
  tat = now
end
-- A call may start once the TAT is within the burst's tolerance of now.
local wait = tat - (burst - 1) * interval - now
if wait < 0 then
  wait = 0
end
if max_wait >= 0 and wait > max_wait then
  return {-15, wait}
end
tat = tat + cost * interval
local not_before = now + tonumber(ARGV[5] or '0')
if tat < not_before then
  tat = not_before
end
-- '%.0f': Lua would print a 16-digit µs time in 14 significant digits.
rcall('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {1, wait}
