"""The request checks that the endpoint (`pipeline.serve.guard`) and OpenAI Batch
(`pipeline.openai.batch_requests`) share: the model name, max_tokens against the cap, the number of images.

Written once, so that both front ends refuse the same request with the same code, param and message. Each
front end subclasses `RequestCaps`: it names the config fields its limits come from (the messages tell the
client which setting refused it) and turns a refusal into its own error (`refusal`): the endpoint's
`ApiError` (an HTTP 400), OpenAI Batch's `LineError` (an error line).

Pure logic: nothing here imports Ray or vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from pipeline.openai.errors import OpenAIError


def is_int(value: Any) -> bool:
    """A JSON integer: Python's bool is an int, JSON's true is not."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RequestCaps:
    """What one request may ask for, whichever front end reads it."""

    model_names: tuple[str, ...]
    max_images: int
    max_tokens_cap: int

    # How the messages name this front end and its settings ("this endpoint serves", "serve.max_tokens_cap"):
    # set by each subclass.
    SERVED_BY: ClassVar[str]
    MODEL_HINT: ClassVar[str] = ""
    TOKENS_SETTING: ClassVar[str]
    IMAGES_SETTING: ClassVar[str]

    @staticmethod
    def refusal(code: str, message: str, param: Optional[str]) -> Exception:
        """The exception a refusal raises; front ends return their own error type."""
        return OpenAIError(message, status=400, code=code, param=param)

    def check_model(self, model: Any) -> None:
        # OpenAI answers an unknown model with 404 model_not_found; issue #4 asks for a 400 for every bad
        # input, so this is a 400 that keeps OpenAI's code.
        if model not in self.model_names:
            raise self.refusal("model_not_found", f"model {model!r} does not exist; {self.SERVED_BY} "
                               f"{', '.join(self.model_names)}{self.MODEL_HINT}", "model")

    def check_token_cap(self, name: str, value: Any) -> None:
        """`name`: max_tokens or max_completion_tokens; a value that is not an integer is left to the caller."""
        if is_int(value) and value > self.max_tokens_cap:
            raise self.refusal("max_tokens_exceeded", f"{name} {value} exceeds the cap of {self.max_tokens_cap} "
                               f"({self.TOKENS_SETTING})", name)

    def check_image_count(self, params: list[str]) -> None:
        """`params`: the parameter path of each image of the request, in order; the first one over the limit
        is the error's param."""
        if len(params) > self.max_images:
            raise self.refusal("too_many_images", f"the request has {len(params)} images; at most "
                               f"{self.max_images} per request ({self.IMAGES_SETTING})", params[self.max_images])
