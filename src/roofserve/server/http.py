"""The HTTP side every roofserve server shares: bounded bodies, one error shape, 4xx for bad input,
the admission bound. Nothing here reaches into LitServe's internals (that is lit.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect


@dataclass
class Rejection:
    """A client error found inside a worker. Returned (not raised) so that one bad image in a batch
    does not fail its neighbours; the HTTP handler turns it into a 4xx answer."""

    status: int
    message: str


# A worker that failed after an answer began (server.lit passes LitServe's error on as this; the LLM API
# also answers it for items that end without an end item).
FAILED_MID_ANSWER = Rejection(500, "the worker failed while generating this answer")


def error_body(status: int, message: str, code: str | None = None) -> dict:
    """The one error shape of every roofserve answer (OpenAI's; `code` a name such as model_not_found,
    else the status)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": code or status}}


class APIError(HTTPException):
    """An HTTPException whose error body names an OpenAI error code."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(status, message)
        self.code = code


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None  # 503s here are all worth a retry
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) anything over max_bytes without reading it all, and (415) a
    body in an encoding we do not decode: a gzip body read as JSON would fail later with a wrong reason."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise HTTPException(415, f"Content-Encoding {encoding!r} is not supported: send the body uncompressed")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise HTTPException(413, f"request body is {declared} bytes; the limit is {max_bytes}")
        except ValueError:
            raise HTTPException(400, "invalid Content-Length header") from None
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise HTTPException(413, f"request body is over the limit of {max_bytes} bytes")
    except ClientDisconnect:  # the client left, or server.connections cut a stalled upload: nobody reads this
        raise HTTPException(408, "the connection closed before the request body was complete") from None
    return bytes(body)


class _Admitting(Protocol):
    metrics: object
    max_queued_requests: int


def overloaded(server: _Admitting) -> JSONResponse | None:
    """503 + Retry-After when the admitted requests are at the bound; else admit (count) the request."""
    metrics = server.metrics
    if metrics.in_flight >= server.max_queued_requests:
        metrics.rejected_overload += 1
        return error_response(503, f"server busy: {metrics.in_flight} requests in progress; retry shortly")
    metrics.in_flight += 1
    return None


async def http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    response = error_response(exc.status_code, str(exc.detail), getattr(exc, "code", None))
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


async def validation_exception(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error_response(400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}")


def parse_json(body: bytes) -> object:
    """json.loads that raises a Rejection-friendly ValueError with a short message."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed JSON: {e.msg if hasattr(e, 'msg') else 'not UTF-8'}") from None
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise ValueError("malformed JSON: nested too deeply") from None
