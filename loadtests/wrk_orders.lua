--[[
  wrk script for `flashsale bench`: place orders as a crowd of shoppers.

  Usage: wrk -t THREADS -s wrk_orders.lua URL -- TOKENS PATH NONCE THREADS [QUANTITY]
    TOKENS    file of `user<TAB>token` lines (`flashsale token --count N --out TOKENS`)
    PATH      e.g. /v1/sales/drop-1/orders
    NONCE     unique per wrk run, so Idempotency-Keys never repeat across runs
    THREADS   the same number as -t (a thread cannot ask wrk how many there are)
    QUANTITY  units per order (default 1)

  Each request carries the next shopper's bearer token (round robin over the file, threads
  interleaved) and a fresh Idempotency-Key, so no request is a replay of another.

  done() prints one line `WRK_RESULT {json}`: requests, duration (µs), errors, non-2xx count
  (status errors), and the latency quantile function (µs) on a grid dense in the tail, which
  lets the caller merge several runs into one distribution.
]]

-- thread_index is a global on purpose: setup() sets it in each thread's own Lua state, and a
-- local of the same name here would hide it (every thread would then send the same keys).
local counter = 0
local thread_count = 1
local tokens = {}
local path, nonce, body

local created = 0
function setup(thread)
  thread:set("thread_index", created)
  created = created + 1
end

function init(args)
  for line in io.lines(args[1]) do
    local tab = line:find("\t", 1, true)
    if tab then
      tokens[#tokens + 1] = "Bearer " .. line:sub(tab + 1)
    end
  end
  if #tokens == 0 then
    error("no `user<TAB>token` lines in " .. args[1])
  end
  path = args[2]
  nonce = args[3]
  thread_count = tonumber(args[4])
  body = '{"quantity":' .. (args[5] or "1") .. '}'
end

function request()
  counter = counter + 1
  -- Threads interleave: thread t sends shoppers t, t + T, t + 2T, ... (T threads).
  local shopper = ((counter - 1) * thread_count + thread_index) % #tokens + 1
  return wrk.format("POST", path, {
    ["Authorization"] = tokens[shopper],
    ["Idempotency-Key"] = nonce .. "-" .. thread_index .. "-" .. counter,
    ["Content-Type"] = "application/json",
  }, body)
end

local function grid()
  local points = {}
  for p = 1, 90 do points[#points + 1] = p end
  for p = 90.5, 98.5, 0.5 do points[#points + 1] = p end
  for p = 99, 99.89, 0.1 do points[#points + 1] = p end
  for p = 99.9, 99.991, 0.01 do points[#points + 1] = p end
  points[#points + 1] = 100
  return points
end

function done(summary, latency, requests)
  local quantiles = {}
  for _, p in ipairs(grid()) do
    quantiles[#quantiles + 1] = string.format("[%.2f,%d]", p, latency:percentile(p))
  end
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,'
      .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,'
      .. '"min_us":%d,"max_us":%d,"mean_us":%.1f,"quantiles_us":[%s]}\n',
    summary.requests, summary.duration, summary.bytes, errors.status,
    errors.connect, errors.read, errors.write, errors.timeout,
    latency.min, latency.max, latency.mean, table.concat(quantiles, ",")))
end
