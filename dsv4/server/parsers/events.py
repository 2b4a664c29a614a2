"""Events produced by the streaming DeepSeek-V4 output parser.

Text deltas carry ``index`` -1; tool events carry the call's 0-based position in the response.
For one call: a ``tool_call`` (text = function name), then ``tool_args`` pieces whose
concatenation is the full arguments JSON string, then ``tool_end`` once it is complete.
"""

from __future__ import annotations

from dataclasses import dataclass

REASONING = "reasoning"
CONTENT = "content"
TOOL_CALL = "tool_call"
TOOL_ARGS = "tool_args"
TOOL_END = "tool_end"


@dataclass(frozen=True)
class ParserEvent:
    """One output delta of kind REASONING, CONTENT, TOOL_CALL, TOOL_ARGS or TOOL_END."""

    kind: str
    text: str = ""
    index: int = -1
