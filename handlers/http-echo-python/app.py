"""wasi:http/proxy echo in Python: answers every request with `200`, a
plain-text body of its path (with the query) on one line, then the request
body as it came. A fresh instance serves each request."""

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

# `blocking-write-and-flush` takes at most 4,096 bytes per call.
CHUNK = 4096


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        reply = (request.path_with_query() or "/").encode() + b"\n"
        body_in = request.consume()
        stream = body_in.stream()
        while True:
            try:
                reply += stream.blocking_read(65536)
            except Exception:
                # `closed`: the end of the body.
                break
        stream.__exit__(None, None, None)
        response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        out = body.write()
        for i in range(0, len(reply), CHUNK):
            out.blocking_write_and_flush(reply[i : i + CHUNK])
        out.__exit__(None, None, None)
        OutgoingBody.finish(body, None)
