"""Every failure leaves as OpenAI error JSON: our own APIErrors, parameters the engine refuses (400),
unknown paths (404), wrong methods (405), and anything unexpected (500; starlette re-raises it
afterwards so the server logs the traceback, which never goes on the wire). A client that left
first gets nothing; the request is counted as 499."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from fleet.control.errors import CLIENT_GONE_STATUS, APIError
from fleet.web_errors import error_response
from replica.engine.sampling_params import SamplingParamsError
from replica.http_api.tracing import REQUEST_ID_SCOPE_KEY


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def sampling_error(request: Request, exc: Exception) -> Response:
    """The engine refused a request's parameters: a 400 naming the field."""
    assert isinstance(exc, SamplingParamsError)
    return error_response(APIError(400, str(exc), exc.param, code=exc.code))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(APIError(exc.status_code, message, headers=dict(exc.headers or {})))


async def client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_GONE_STATUS)


async def unexpected(request: Request, exc: Exception) -> Response:
    """Starlette answers this outside every middleware, so the request id that tracing.py keeps
    in the scope is added here."""
    request_id: bytes | None = request.scope.get(REQUEST_ID_SCOPE_KEY)
    headers = {"X-Request-Id": request_id.decode("latin-1")} if request_id else {}
    return error_response(APIError(500, "internal server error", headers=headers))


EXCEPTION_HANDLERS = {
    APIError: api_error,
    SamplingParamsError: sampling_error,
    HTTPException: http_error,
    ClientDisconnect: client_gone,  # the client left while sending its body or awaiting the answer
    Exception: unexpected,
}
