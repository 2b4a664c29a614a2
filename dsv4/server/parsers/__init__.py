"""Parsers that turn generated DeepSeek-V4 text into OpenAI chat deltas.

``DSV4OutputParser`` splits a stream into reasoning, content and tool-call events; its start
state comes from the rendered prompt (``prompt_ends_in_reasoning``).
"""

from dsv4.server.parsers.output_parser import (
    CONTENT,
    REASONING,
    TOOL_ARGS,
    TOOL_CALL,
    TOOL_END,
    DSV4OutputParser,
    ParserEvent,
    parse_completion,
    prompt_ends_in_reasoning,
)

__all__ = [
    "CONTENT", "REASONING", "TOOL_ARGS", "TOOL_CALL", "TOOL_END", "DSV4OutputParser",
    "ParserEvent", "parse_completion", "prompt_ends_in_reasoning",
]
