"""Forced tool calls for ``tool_choice: "required"`` and a named function (a DSML prefix grammar).

The engine samples freely, so the call is forced from outside as a plan of phases
(``dsv4.server.generation``): in thinking mode the model first reasons until ``</think>``
(an EOS there is dropped, and ``</think>`` is forced also when the reasoning reaches its cap,
which leaves room for the call in the budget); then the DSML opener
``\\n\\n<｜DSML｜tool_calls>\\n<｜DSML｜invoke name="`` is forced. A named function (or the only
declared tool) is forced too; otherwise the model proposes a name in a hidden phase and the
declared tool that best matches it is forced, with the header of its first required parameter
(or the whole invoke for a tool without parameters). The model then writes the values; the
output parser closes whatever it leaves open, so the response always carries a call to a
declared tool. Values are not constrained (that needs a per-token hook in the sampler).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dsv4.encoding_tokens import DSML, THINK_CLOSE
from dsv4.server.generation import Phase
from dsv4.server.protocol import APIError
from dsv4.server.validation import check_tools
from dsv4.tokenizer import Tokenizer

__all__ = ["INVOKE_PREFIX", "OPENER", "ToolCallPlan", "resolve_tool_choice", "tool_schemas"]

OPENER = f"\n\n<{DSML}tool_calls>\n"
INVOKE_PREFIX = f'<{DSML}invoke name="'
HEADER_END = '">\n'
_NAME_TOKENS = 48  # hidden phase cap: a tool name is at most 64 characters
_VALUE_ROOM = 16  # tokens the reasoning leaves for the first value, beyond the forced text


def tool_schemas(tools: Sequence[dict[str, Any]] | None) -> dict[str, dict[str, Any] | None]:
    """Name -> parameters schema of an OpenAI ``tools`` list (400 naming the bad entry; rules in
    ``dsv4.server.validation.check_tools``)."""
    check_tools(tools)
    return {tool["function"]["name"]: tool["function"].get("parameters")
            for tool in tools or []}


def resolve_tool_choice(tool_choice: str | dict[str, Any] | None,
                        names: list[str]) -> tuple[bool, str | None, bool]:
    """-> (tools_enabled, forced name or None, force a call). 400 for an invalid choice."""
    if tool_choice is None:
        return bool(names), None, False
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or a named "
                           f"function, not {tool_choice!r}", param="tool_choice")
        if tool_choice == "none":
            return False, None, False
        if not names:
            raise APIError(400, f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
        if tool_choice == "auto":
            return True, None, False
        return True, names[0] if len(names) == 1 else None, True
    fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise APIError(400, "a named tool_choice is {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}", param="tool_choice")
    if name not in names:
        raise APIError(400, f"tool_choice names {name!r}, which is not in tools",
                       param="tool_choice")
    return True, name, True


def best_name(proposal: str, names: list[str]) -> str:
    """The declared name the proposal means: exact, else longest common prefix, else first."""
    proposal = proposal.split('"', 1)[0].strip()
    if proposal in names:
        return proposal

    def common(name: str) -> int:
        n = 0
        while n < min(len(name), len(proposal)) and name[n] == proposal[n]:
            n += 1
        return n

    return max(names, key=lambda name: (common(name), -names.index(name)))


def _header_rest(name: str, parameters: dict[str, Any] | None) -> tuple[str, bool]:
    """Text after ``name="`` up to where the model takes over, and whether it does at all.

    With parameters, the first required one (else the first declared) is opened, with its
    ``string`` flag from the schema type, so the invoke header can never be malformed; without
    any, the whole block is closed.
    """
    props = (parameters or {}).get("properties") or {}
    if not isinstance(props, dict) or not props:
        return f"{name}{HEADER_END}\n</{DSML}invoke>\n</{DSML}tool_calls>", False
    required = [k for k in (parameters or {}).get("required") or [] if k in props]
    key = required[0] if required else next(iter(props))
    kind = props[key].get("type") if isinstance(props[key], dict) else None
    is_str = kind == "string" or (isinstance(kind, list) and "string" in kind)
    flag = "true" if is_str else "false"
    return f'{name}{HEADER_END}<{DSML}parameter name="{key}" string="{flag}">', True


class ToolCallPlan:
    """Phases that make one choice end in a call to a declared tool (see module docstring)."""

    def __init__(self, tokenizer: Tokenizer, *, thinking: bool,
                 tools: dict[str, dict[str, Any] | None], forced_name: str | None) -> None:
        self.tokenizer, self.thinking = tokenizer, thinking
        self.tools, self.forced_name = tools, forced_name  # name -> parameters schema
        self.think_close = tokenizer.token_to_id(THINK_CLOSE)
        self.eos = tokenizer.eos_token_id
        self.state = "reasoning" if thinking else "open"

    def start(self) -> Phase:
        if self.state == "reasoning":
            return Phase(stop_token_ids=[self.think_close], drop_ids=(self.eos,),
                         reserve=self._reserve())
        return self._open(prefix="")

    def next(self, token_ids: list[int], finish_reason: str | None,
             stop_reason: int | str | None) -> Phase | None:
        if finish_reason == "abort":
            return None
        if self.state == "name":  # whatever the model proposed (even cut short), force a name
            return self._invoke("", best_name(self.tokenizer.decode(token_ids), list(self.tools)))
        if self.state == "reasoning":  # ended by </think>, a dropped EOS or its own cap
            closed = bool(token_ids) and token_ids[-1] == self.think_close
            return self._open(prefix="" if closed else THINK_CLOSE)
        return None  # the arguments phase ended: done

    def _reserve(self) -> int:
        """Budget the reasoning leaves: the longest forced call text plus room for a value."""
        names = [self.forced_name] if self.forced_name is not None else list(self.tools)
        head = THINK_CLOSE + OPENER + INVOKE_PREFIX
        texts = [head + _header_rest(n, self.tools[n])[0] for n in names]
        return _VALUE_ROOM + max(len(self.tokenizer.encode(t)) for t in texts)

    def _open(self, prefix: str) -> Phase:
        text = prefix + OPENER + INVOKE_PREFIX
        if self.forced_name is not None:
            return self._invoke(text, self.forced_name)
        self.state = "name"
        return Phase(force_ids=self.tokenizer.encode(text), hidden=True, hidden_until='"',
                     max_tokens=_NAME_TOKENS)

    def _invoke(self, text: str, name: str) -> Phase:
        rest, generate = _header_rest(name, self.tools[name])
        self.state = "args"
        return Phase(force_ids=self.tokenizer.encode(text + rest), generate=generate)
