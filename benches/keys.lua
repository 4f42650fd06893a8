-- wrk's requests for benches/compare.sh and benches/flamegraph.sh: the
-- URL's path, with a key picked at random per request from KEYS_FILE (one
-- a line), sent as "Bearer <key>" in KEY_HEADER (default Authorization).
local keys = {}
for line in io.lines(os.getenv("KEYS_FILE")) do keys[#keys + 1] = "Bearer " .. line end
local n = #keys
local header = os.getenv("KEY_HEADER") or "Authorization"
request = function()
  return wrk.format("GET", nil, { [header] = keys[math.random(n)] })
end
