"""Typed errors that cross layer boundaries.

``InvalidRequestError`` is what every validation step raises for input a caller can fix: a bad
sampling parameter, a prompt over the context, a token id outside the vocabulary, a malformed
chat message. It is a ValueError (so plain callers need nothing special) that carries the name
of the offending parameter (``param``) and, where OpenAI defines one, an error ``code``; the
server copies both into its error body instead of reading the message text.
"""

from __future__ import annotations

__all__ = ["InvalidRequestError"]


class InvalidRequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
