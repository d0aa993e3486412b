"""Reference servers the benchmark measures bazaar against, each one uvicorn process.

``trivial``: a raw ASGI callable that drains the body of any request and answers a constant
JSON object. On uvicorn with httptools and uvloop and no access log, its throughput is the
HTTP ceiling of one Python core, and also the most the load generator can show.

``plain``: the obvious way to serve one model without a gateway: a Starlette route that
parses the v2 JSON body with orjson, runs ONNX Runtime once per request (no batching) and
answers v2 JSON. The session is configured as the model server configures its own (one
intra-op and one inter-op thread, no spinning, full graph optimisation). ``session.run`` is
called inline on the event loop: for a sub-millisecond model the hop to a thread pool
(``run_in_threadpool``) costs more than the GIL it releases, and measured on this machine it
was the slower of the two.

Run as ``python -m loadtests.references trivial|plain --port P [--model PATH]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TRIVIAL_BODY = b'{"ok":true}'
_TRIVIAL_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(TRIVIAL_BODY)).encode()),
    ],
}
_TRIVIAL_BODY: Message = {"type": "http.response.body", "body": TRIVIAL_BODY}


async def trivial_app(scope: Message, receive: Receive, send: Send) -> None:
    """Answer every HTTP request with a constant JSON body (lifespan is off)."""
    more = True
    while more:
        message = await receive()
        more = bool(message.get("more_body", False))
    await send(_TRIVIAL_START)
    await send(_TRIVIAL_BODY)


def session_for(model: Path) -> ort.InferenceSession:
    """A CPU session with the model server's settings: one thread each, no spinning."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def plain_app(model: Path) -> Starlette:
    """POST /v2/models/{name}/infer with one FP32 JSON input, answered with every output."""
    session = session_for(model)
    output_names = [output.name for output in session.get_outputs()]

    async def infer(request: Request) -> Response:
        name = request.path_params["model"]
        tensor = orjson.loads(await request.body())["inputs"][0]
        array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        results = session.run(output_names, {tensor["name"]: array})
        outputs = [
            {
                "name": output_name,
                "datatype": "INT64" if result.dtype == np.int64 else "FP32",
                "shape": list(result.shape),
                "data": result.ravel(),
            }
            for output_name, result in zip(output_names, results, strict=True)
        ]
        body = {"model_name": name, "model_version": "1", "outputs": outputs}
        return Response(
            orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
        )

    async def ready(request: Request) -> Response:
        return Response(b'{"ready":true}', media_type="application/json")

    return Starlette(
        routes=[
            Route("/v2/health/ready", ready),
            Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["trivial", "plain"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, help="the ONNX file (plain only)")
    args = parser.parse_args()
    if args.kind == "plain" and args.model is None:
        parser.error("plain needs --model")
    app = trivial_app if args.kind == "trivial" else plain_app(args.model)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
