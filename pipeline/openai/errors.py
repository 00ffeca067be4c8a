"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, shared by the endpoint (an
HTTP error body: `pipeline.serve.guard.ApiError`) and OpenAI Batch (an error line:
`pipeline.openai.batch_requests.LineError`). Pure logic: no Ray, no vLLM."""
from __future__ import annotations

from typing import Any, Optional


class OpenAIError(Exception):
    """A refused request with OpenAI's error fields. `status`: the HTTP status the API answers it with
    (None for an OpenAI Batch line that is no request at all)."""

    def __init__(self, message: str, *, status: Optional[int] = 400, code: Optional[str] = None,
                 param: Optional[str] = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.type = type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
