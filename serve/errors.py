"""Errors the front answers itself, in vLLM's error shape (what vLLM's own routes return):

    {"error": {"message": ..., "type": ..., "param": ..., "code": <HTTP status>}}

so a client sees one shape whether vLLM or lorafleet refused its request. `type` is the name
of the exception the official `openai` client raises for that status.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          405: "MethodNotAllowedError", 413: "BadRequestError", 422: "UnprocessableEntityError",
          429: "RateLimitError", 499: "ClientClosedRequest", 500: "InternalServerError",
          503: "ServiceUnavailableError"}


class OpenAIError(Exception):
    """A refusal with an HTTP status; `param` names the request field at fault, when one is."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def adapter_refused(why: str) -> OpenAIError:
    """The registry's gate or the engine refused the adapter a request names (lorafleet's 422)."""
    return OpenAIError(422, why, param="model")
