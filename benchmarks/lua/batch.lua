-- wrk: Segment POST /v1/batch bodies of 100 e-commerce events, every message
-- id new (thread number, then a counter), users cycling over USERS.
local USERS = tonumber(os.getenv("SCALE_USERS") or "50000")
local PER_BATCH = 100
local counter = 0
local thread_id = 0
local threads = 0
-- wrk runs this file once in each thread's own Lua state, then setup() (in
-- the main state) sets the global `wrk_thread` there. A `local` of that name
-- would hide the global: every thread was thread 0 and sent the same ids.

function setup(thread)
  thread:set("wrk_thread", threads)
  threads = threads + 1
end

function init(args)
  thread_id = tonumber(wrk_thread) or 0
end

local names = {"Product Viewed", "Product Viewed", "Product Viewed", "Product Added"}
local products = {"kettle-steel", "mug-stone", "teapot-cast", "grinder-burr", "press-french", "scale-drip"}

function request()
  local events = {}
  for i = 1, PER_BATCH do
    counter = counter + 1
    local n = counter * 7919 + thread_id
    local user = "u" .. (n % USERS)
    local name = names[(counter % #names) + 1]
    local product = products[(n % #products) + 1]
    local props
    if name == "Product Added" then
      props = '{"cart_id":"c' .. (n % USERS) .. '","product_id":"' .. product .. '","name":"X","price":20,"quantity":1}'
    else
      props = '{"product_id":"' .. product .. '","name":"X","price":20}'
    end
    events[i] = '{"type":"track","messageId":"w' .. thread_id .. "-" .. counter .. '","userId":"' .. user
      .. '","event":"' .. name .. '","properties":' .. props .. '}'
  end
  local body = '{"batch":[' .. table.concat(events, ",") .. ']}'
  return wrk.format("POST", "/v1/batch", {["Content-Type"] = "application/json",
    ["Authorization"] = "Basic ZGV2LWtleTo="}, body)
end
