"""uvicorn's httptools protocol, with its one plain-text answer made an OpenAI error envelope.

A request uvicorn cannot parse (a request line of a megabyte, bytes that are no HTTP, a malformed
header) never reaches the app: uvicorn answers it itself with `400 Invalid HTTP request received.`
as text/plain. Every other error this server sends is `{"error": {...}}`, so clients parse one
shape; this class sends that shape for the parser's 400 too.

Used by `spendledger serve` as `http="spendledger.api.http_protocol:JsonErrorHttpToolsProtocol"`: a module-level
class named by import string, so each `--workers N` process imports it on its own.
"""

from __future__ import annotations

import json
from typing import Final

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

IMPORT_STRING: Final = "spendledger.api.http_protocol:JsonErrorHttpToolsProtocol"

INVALID_REQUEST_BODY: Final = json.dumps(
    {
        "error": {
            "message": "Invalid HTTP request: the request line or headers are malformed or too large",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_request",
        }
    }
).encode()


class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose 400 for an unparsable request is the JSON error envelope."""

    def send_400_response(self, msg: str) -> None:
        # `msg` is uvicorn's own fixed text, already logged by the caller; the body says it in JSON.
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(INVALID_REQUEST_BODY)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                INVALID_REQUEST_BODY,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()
