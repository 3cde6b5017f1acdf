"""The error of a prompt that cannot be prepared for the model (chat template, images), for a 400."""

from __future__ import annotations


class PromptError(ValueError):
    """The messages (or their images) cannot become this model's prompt; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
