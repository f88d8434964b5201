-- wrk script for bench/gateway.py: send pre-built HTTP requests, each once, in file order.
-- The file holds whole HTTP/1.1 requests separated by NUL bytes (wallet-signed ahead of the run,
-- since the gateway accepts each signature once). Usage: wrk -t1 ... -s wrk_replay.lua URL -- FILE
-- Past the end it starts again; those repeats are refused as replays and counted as non-2xx, so
-- bench/gateway.py writes more requests than a run can send.

local requests, count, next_index = {}, 0, 0

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*a")
  f:close()
  for req in string.gmatch(data, "([^%z]+)") do
    count = count + 1
    requests[count] = req
  end
  assert(count > 0, "no requests in " .. args[1])
end

function request()
  next_index = next_index % count + 1
  return requests[next_index]
end
