"""The request contract shared by the engine, the reference pipeline, the config and the server: the tasks a
request may ask for, the limits that are part of the model's contract, and the error a request that breaks them
gets.

Kept free of imports so every layer (config parsing, the OpenAI schemas, the stage machine) can use it cheaply."""

from __future__ import annotations

BOT_TASKS = ("image", "auto", "recaption", "think_recaption", "think")
"""What the model does before (or instead of) drawing: `image` draws at once; `recaption` rewrites the prompt
first; `think` reasons first; `think_recaption` reasons, then rewrites, then draws; `auto` answers in free text
(and draws only if the model decides to)."""

MAX_COND_IMAGES = 3
"""Condition images per edit / fusion request (the official model's limit)."""


class RequestError(ValueError):
    """A request that cannot run (bad image, size, task, budget): reported to that request only. `param` names the
    request field at fault as the HTTP API calls it (None: the request as a whole) and `code` says what is wrong
    with it; the API server answers with both as they are."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code or ("invalid_value" if param is not None else "invalid_request")


__all__ = ["BOT_TASKS", "MAX_COND_IMAGES", "RequestError"]
