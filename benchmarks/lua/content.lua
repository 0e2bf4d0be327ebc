-- wrk: first-touch content calls: every request a user not asked for before
-- (cycling over the USERS the batch script made), the whole set of blocks.
local USERS = 50000
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
  counter = thread_id * 10007
end

function request()
  counter = counter + 1
  local path = "/v1/content/u" .. (counter % USERS) .. "?blocks=cart,recommendations,recently_viewed,offers"
  return wrk.format("GET", path, {["Authorization"] = "Bearer dev-key", ["Sendtime-Deadline-Ms"] = "500"})
end
