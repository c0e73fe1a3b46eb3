"""The floor: a bare Litestar app that only parses an Open Inference Protocol V2 request.

``POST /v2/models/{name}/infer`` decodes the JSON body with msgspec into V2 request structs
(every tensor's name, shape, datatype and data; a malformed body is a 400) and answers a fixed,
small V2 response; ``GET /v2/health/ready`` answers 200. No model, no batching, no metrics: what
any Litestar V2 endpoint costs on this runner, and so the most infercore's request path could
reach.

It runs on the same runner, with the same runner options, as ``infercore serve``
(``infercore/cli.py``): uvicorn driven by ``uvloop.run``, infercore's httptools protocol class
(``infercore.server.shutdown.http_protocol``), lifespan on, no access log, no server header,
uvicorn's logging config left alone::

    uv run python benchmarks/floor_app.py --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import math
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post


class RequestInput(msgspec.Struct, forbid_unknown_fields=False):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class InferenceRequest(msgspec.Struct, forbid_unknown_fields=False):
    inputs: list[RequestInput]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] | None = None


_decode = msgspec.json.Decoder(InferenceRequest).decode
_JSON = "application/json"


@post("/v2/models/{name:str}/infer", status_code=200)
async def infer(name: str, request: Request[Any, Any, Any]) -> Response[bytes]:
    try:
        req = _decode(await request.body())
    except msgspec.ValidationError as exc:
        return Response(msgspec.json.encode({"error": str(exc)}), status_code=400, media_type=_JSON)
    except msgspec.DecodeError:
        return Response(b'{"error":"malformed JSON"}', status_code=400, media_type=_JSON)
    rows = req.inputs[0].shape[0] if req.inputs and req.inputs[0].shape else 1
    body = (
        b'{"model_name":"%s","outputs":[{"name":"label","datatype":"INT64","shape":[%d],'
        b'"data":[%s]}]}' % (name.encode(), rows, b",".join([b"0"] * rows))
    )
    return Response(body, media_type=_JSON)


@get("/v2/health/ready", sync_to_thread=False)
def ready() -> dict[str, bool]:
    return {"ready": True}


app = Litestar(route_handlers=[infer, ready], openapi_config=None)


async def _serve(host: str, port: int) -> None:
    import uvicorn

    try:  # infercore's own protocol class, as `infercore serve` uses it
        from infercore.server.shutdown import IDLE_LINGER_S, http_protocol

        http: Any = http_protocol(min(IDLE_LINGER_S, 30 / 2))
    except ImportError:
        http = "httptools"
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(30),
        server_header=False,
    )
    server = uvicorn.Server(config)
    await server.serve()
    if not server.started:
        raise SystemExit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args.host, args.port))
    else:
        uvloop.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
