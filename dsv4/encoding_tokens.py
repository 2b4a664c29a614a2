"""Special-token and DSML tag strings of the DeepSeek-V4 chat format, and its JSON encoder.

Every string is exact (``shared/docs/chat_format.md`` section 1.1): prompts and parsers match
them byte for byte. ``to_json`` is the serializer the reference encoder and parser share.
"""

from __future__ import annotations

import json
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DSML = "｜DSML｜"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# DSML tags (the wrapper name is "tool_calls" in V4, "function_calls" in V3.2)
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls"  # what the reference parser looks for in content
BLOCK_OPEN = f"<{DSML}tool_calls"
BLOCK_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke"
PARAM_OPEN = f"<{DSML}parameter"
PARAM_END = f"/{DSML}parameter"


def to_json(value: Any) -> str:
    """Python ``json.dumps`` as the reference uses it: raw non-ASCII, ASCII escapes as fallback."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except Exception:  # noqa: BLE001 - same fallback as the reference
        return json.dumps(value, ensure_ascii=True)
