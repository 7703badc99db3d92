"""The error every refusal becomes: an HTTP status with OpenAI's ``type``/``code``/``param``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from meswitch.server import protocol as P


class APIError(Exception):
    """An error with its HTTP status and OpenAI ``type``/``code``/``param``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(P.error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)
