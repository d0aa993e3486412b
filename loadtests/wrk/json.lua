-- POST one fixed v2 JSON inference request, read from the file named by $BENCH_BODY.
local file = assert(io.open(assert(os.getenv("BENCH_BODY")), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
