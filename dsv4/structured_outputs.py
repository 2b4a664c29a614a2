"""Structured outputs: what a request constrains its output to, and the grammar compiler.

``StructuredOutputsParams`` has vLLM's shape (``json``, ``regex``, ``choice``, ``grammar``,
``json_object``; exactly one is set) and rides on ``SamplingParams.structured_outputs``.
``GrammarCompiler`` turns one into an llguidance matcher over the V4 vocabulary: the tokenizer is
converted once (lazily: it takes about 2 s for the 129,280-token vocabulary), compiled grammars are
kept in a bounded LRU keyed by their text, and each request gets a cheap copy of the cached
matcher. A spec the backend cannot compile raises ``InvalidRequestError`` naming the field.

Why llguidance and not xgrammar: xgrammar's wheel requires ``transformers`` at runtime (dsv4
keeps that a test-only extra), while llguidance has no Python dependency, reads the
``tokenizers`` JSON of the checkpoint directly and computes a mask without precomputation per
grammar, so a schema first seen in a request costs about a millisecond to compile.

JSON is generated compact with one space after ``,`` and ``:`` (as ``json.dumps`` writes it): no
free whitespace, so a model cannot spend its budget on blanks inside a value.
"""

from __future__ import annotations

import json as _json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from dsv4.errors import InvalidRequestError
from dsv4.tokenizer import Tokenizer

__all__ = ["GrammarCompiler", "StructuredOutputsParams", "JSON_OPTIONS"]

# the JSON layout every schema compiles to (see the module docstring)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    json: str | dict[str, Any] | None = None  # a JSON schema (a dict or its JSON text)
    regex: str | None = None  # the whole output matches this regex
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # a Lark (llguidance dialect) or GBNF grammar
    json_object: bool | None = None  # any JSON object

    def __post_init__(self) -> None:
        set_ = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise InvalidRequestError(
                f"structured_outputs takes exactly one of {', '.join(_KINDS)}; got "
                f"{', '.join(set_) or 'none'}", param="structured_outputs")
        kind = set_[0]
        value = getattr(self, kind)
        ok = {"json": isinstance(value, (str, dict)),
              "regex": isinstance(value, str) and value != "",
              "choice": isinstance(value, list) and bool(value)
              and all(isinstance(c, str) and c for c in value),
              "grammar": isinstance(value, str) and value.strip() != "",
              "json_object": value is True}[kind]
        if not ok:
            what = {"json": "a JSON schema (an object or its JSON text)",
                    "regex": "a non-empty string", "choice": "a non-empty list of non-empty "
                    "strings", "grammar": "a non-empty string", "json_object": "true"}[kind]
            raise InvalidRequestError(f"structured_outputs.{kind} must be {what}",
                                      param=f"structured_outputs.{kind}")
        if kind == "json" and isinstance(value, str):
            try:
                self.json = _json.loads(value)
            except ValueError as exc:
                raise InvalidRequestError(f"structured_outputs.json is not valid JSON: {exc}",
                                          param="structured_outputs.json") from None
        if kind == "json" and not isinstance(self.json, (dict, bool)):
            raise InvalidRequestError("structured_outputs.json must be a JSON schema object",
                                      param="structured_outputs.json")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): the cache key."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json":
            return kind, _json.dumps(value, sort_keys=True, ensure_ascii=False)
        if kind == "choice":
            return kind, _json.dumps(value, ensure_ascii=False)
        return kind, str(value)


class GrammarCompiler:
    """Compiles StructuredOutputsParams against one tokenizer; thread-safe (the server checks
    requests in worker threads, the engine builds matchers in its own)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 128) -> None:
        self.tokenizer, self.vocab_size, self.cache_size = tokenizer, vocab_size, cache_size
        self.eos_token_id = tokenizer.eos_token_id
        self._lltok = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()  # key -> LLMatcher

    @property
    def lltokenizer(self) -> Any:
        """The llguidance view of the vocabulary (built on first use)."""
        with self._lock:
            if self._lltok is None:
                import llguidance

                self._lltok = llguidance.LLTokenizer(self.tokenizer.to_json(),
                                                     n_vocab=self.vocab_size,
                                                     eos_token=self.eos_token_id)
            return self._lltok

    def check(self, spec: StructuredOutputsParams, param: str | None = None) -> None:
        """Compile (or find cached) ``spec``; InvalidRequestError naming ``param`` (default
        structured_outputs.<kind>) when it cannot be compiled."""
        self._template(spec, param)

    def matcher(self, spec: StructuredOutputsParams, param: str | None = None) -> Any:
        """A fresh llguidance LLMatcher for one request, at the start of the grammar."""
        template = self._template(spec, param)
        with self._lock:
            return template.deep_copy()

    def _template(self, spec: StructuredOutputsParams, param: str | None) -> Any:
        key = spec.key()
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        lltok = self.lltokenizer
        import llguidance

        param = param or f"structured_outputs.{key[0]}"
        try:
            grammar = _to_llguidance(spec)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise InvalidRequestError(f"{param}: {_first_line(exc)}", param=param) from None
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{param}: {_first_line(matcher.get_error())}",
                                      param=param)
        with self._lock:
            self._cache[key] = matcher
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher


def _to_llguidance(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar text for a spec (ValueError / RuntimeError when it is bad)."""
    from llguidance import LLMatcher, grammar_from

    kind = spec.kind
    if kind == "json":
        return LLMatcher.grammar_from_json_schema(spec.json, defaults=JSON_OPTIONS)
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        lark = "start: " + " | ".join(_json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return LLMatcher.grammar_from_lark(lark)
    return grammar_from("grammar", spec.grammar)


def _first_line(error: object) -> str:
    """The backend's message, shortened to what names the problem."""
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return " ".join(lines[:3])[:500] if lines else "cannot be compiled"
