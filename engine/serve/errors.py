"""Errors a request can cause: an HTTP status, an OpenAI-style type and a one-line message."""

from __future__ import annotations

from engine.errors import SiftError


class RequestError(SiftError):
    """A bad request: the server answers `status` with {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.param = param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}


def bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, message, param=param)


def not_found(message: str, param: str | None = None) -> RequestError:
    return RequestError(404, message, kind="not_found_error", param=param)


def too_large(message: str, param: str | None = None) -> RequestError:
    return RequestError(413, message, param=param)
