-- POST one fixed v2 binary-tensor request: $BENCH_BODY names a file holding the JSON header
-- then the tensor bytes; $BENCH_HEADER_LENGTH is the JSON header's length in bytes.
local file = assert(io.open(assert(os.getenv("BENCH_BODY")), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = assert(os.getenv("BENCH_HEADER_LENGTH"))
