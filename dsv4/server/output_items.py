"""The output parser's events as a list of output items, for APIs whose answer is such a list.

Anthropic's content blocks and the Responses API's output items have the same shape: a run of
reasoning, a run of answer text, each tool call, in the order the model wrote them; each item
opens, grows by deltas and closes. ``OutputItems.feed`` turns parser events
(``dsv4.server.parsers``) into those steps; the API modules only name them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dsv4.server.parsers import CONTENT, REASONING, TOOL_ARGS, TOOL_CALL, ParserEvent

__all__ = ["CALL", "CLOSE", "DELTA", "OPEN", "REASONING_ITEM", "TEXT", "Item", "OutputItems",
           "Step"]

REASONING_ITEM, TEXT, CALL = "reasoning", "text", "call"
OPEN, DELTA, CLOSE = "open", "delta", "close"


@dataclass
class Item:
    kind: str  # REASONING_ITEM | TEXT | CALL
    text: str = ""  # reasoning or answer text, or a call's arguments so far
    name: str = ""  # a call's function name


@dataclass
class Step:
    op: str  # OPEN | DELTA | CLOSE
    index: int  # item index
    text: str = ""  # DELTA: the new text


class OutputItems:
    def __init__(self) -> None:
        self.items: list[Item] = []
        self.open: int | None = None
        self.calls: dict[int, int] = {}  # the parser's call index -> item index

    def feed(self, events: Iterable[ParserEvent]) -> list[Step]:
        out: list[Step] = []
        for ev in events:
            if ev.kind in (REASONING, CONTENT):
                kind = REASONING_ITEM if ev.kind == REASONING else TEXT
                if not ev.text:
                    continue
                if self.open is None or self.items[self.open].kind != kind:
                    out += self.close()
                    out.append(self._open(Item(kind)))
                out.append(self._delta(self.open, ev.text))  # type: ignore[arg-type]
            elif ev.kind == TOOL_CALL:
                out += self.close()
                out.append(self._open(Item(CALL, name=ev.text)))
                self.calls[ev.index] = self.open  # type: ignore[assignment]
            elif ev.kind == TOOL_ARGS:
                if ev.text:
                    out.append(self._delta(self.calls[ev.index], ev.text))
            else:  # TOOL_END
                out += self.close()
        return out

    def close(self) -> list[Step]:
        """Close the open item (at a change of kind, a call's end, and the end of output)."""
        if self.open is None:
            return []
        index, self.open = self.open, None
        return [Step(CLOSE, index)]

    def _open(self, item: Item) -> Step:
        self.open = len(self.items)
        self.items.append(item)
        return Step(OPEN, self.open)

    def _delta(self, index: int, text: str) -> Step:
        self.items[index].text += text
        return Step(DELTA, index, text)
