"""StructuredOutputManager: the grammar state of each constrained request, and its token masks.

Driver only. Each request whose SamplingParams carry ``structured_outputs`` gets an llguidance
matcher (``dsv4.structured_outputs.GrammarCompiler``). Before a step, ``prepare(batch)`` brings
each constrained sampling row's matcher up to the row's output tokens and computes the rows'
allowed-token bitmasks in one parallel call; the result (``GrammarMask``) travels in the batch,
so every rank that samples applies the same mask (``Sampler.apply_grammar``). Rows without a
constraint are not touched at all. In a single-process engine the masks are computed in a
helper thread while the model runs (``prepare_async``); the sampler waits for them.

The matcher state is a function of the output tokens: it consumes the tokens it has not seen
yet, so a preempted request (which keeps its output and recomputes the cache) needs nothing, and
a token the grammar did not allow (a forced one) leaves the matcher in error, which then allows
only EOS. A prompt that ends with ``<think>`` opens the reasoning: the reasoning is free
(except that EOS is masked, so the answer cannot be skipped) and the grammar starts after the
``</think>`` token. A grammar that is complete allows EOS; one that can go no further allows only
EOS, so the request ends with finish_reason "stop".

A row that verifies k drafts (speculative decoding) gets a mask for each of its k + 1
positions: position j is masked as the state after the drafts before it leaves it (llguidance
consumes them tentatively and rolls back), so every accepted token follows the grammar. A
``</think>`` among the drafts starts the grammar at the position after it. Positions past a
draft the grammar does not allow are never reached (that draft cannot be accepted); they get
the last reachable position's mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from dsv4.encoding_tokens import THINK_CLOSE, THINK_OPEN
from dsv4.engine.batch import GrammarMask, ScheduledBatch
from dsv4.errors import InvalidRequestError
from dsv4.sampling_params import SamplingParams
from dsv4.structured_outputs import GrammarCompiler

__all__ = ["StructuredOutputManager"]

logger = logging.getLogger(__name__)


class _RequestGrammar:
    def __init__(self, matcher: object, in_reasoning: bool) -> None:
        self.matcher = matcher
        self.start: int | None = None if in_reasoning else 0  # output index where it begins
        self.scanned = 0  # output tokens searched for </think> so far
        self.consumed = 0  # output tokens (from start) the matcher has seen

    def sync(self, output: Sequence[int], think_close: int | None) -> None:
        if self.start is None:
            for i in range(self.scanned, len(output)):
                if output[i] == think_close:
                    self.start = i + 1
                    break
            else:
                self.scanned = len(output)
                return
        new = output[self.start + self.consumed:]
        if new:
            self.matcher.consume_tokens(list(new))
            self.consumed += len(new)


class StructuredOutputManager:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.compiler: GrammarCompiler | None = None
        self.think_open = self.think_close = None
        self._states: dict[str, _RequestGrammar] = {}
        self._executor = None
        self._helper: ThreadPoolExecutor | None = None

    def enable(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self.think_open = compiler.tokenizer.token_to_id(THINK_OPEN)
        self.think_close = compiler.tokenizer.token_to_id(THINK_CLOSE)

    def __len__(self) -> int:
        return len(self._states)

    def add_request(self, request_id: str, params: SamplingParams,
                    prompt_token_ids: Sequence[int]) -> None:
        """Create the request's matcher (InvalidRequestError when its spec does not compile)."""
        spec = params.structured_outputs
        if spec is None:
            return
        if self.compiler is None:
            raise InvalidRequestError("structured outputs need the engine's tokenizer: "
                                      "call LLMEngine.enable_structured_outputs(tokenizer)",
                                      param="structured_outputs")
        in_reasoning = bool(prompt_token_ids) and prompt_token_ids[-1] == self.think_open
        self._states[request_id] = _RequestGrammar(self.compiler.matcher(spec), in_reasoning)

    def remove(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def prepare_async(self, batch: ScheduledBatch) -> Future:
        """``prepare`` in a helper thread, so the masks are computed while the model runs
        (llguidance works without the GIL). The caller waits for it before the batch's requests
        change (before ``update_from_output``)."""
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="dsv4-grammar")
        return self._helper.submit(self.prepare, batch)

    def prepare(self, batch: ScheduledBatch) -> GrammarMask | None:
        """The masks of ``batch``'s constrained sampling positions (one per sampling row, k + 1
        for a row that verifies k drafts, laid out as ``SamplingMetadata.from_batch`` lays
        them out); None when it has none."""
        if not self._states or batch.is_empty:
            return None
        rows: list[int] = []  # sampling positions under a grammar, in order
        work: list[tuple[object, int, list[int]]] = []  # (matcher, its first mask, drafts)
        banned: list[tuple[int, int]] = []
        eos = self.compiler.eos_token_id if self.compiler is not None else None
        position = 0
        for i in batch.sample_indices:
            n = batch.num_drafts(i)
            drafts = batch.token_ids[i][len(batch.token_ids[i]) - n:] if n else []
            first, position = position, position + n + 1
            state = self._states.get(batch.req_ids[i])
            if state is None:
                continue
            state.sync(batch.output_token_ids[i], self.think_close)
            free = 0  # positions still in the reasoning: free, but EOS must not end the answer
            if state.start is None:
                free = next((j + 1 for j, t in enumerate(drafts) if t == self.think_close),
                            n + 1)
                if eos is not None:
                    banned += [(first + j, eos) for j in range(free)]
            if free <= n:  # the grammar covers positions first + free .. first + n
                work.append((state.matcher, len(rows), drafts[free:]))
                rows.extend(range(first + free, first + n + 1))
        if not rows and not banned:
            return None
        words = (self.vocab_size + 31) // 32
        bitmask = torch.zeros(len(rows), words, dtype=torch.int32)
        if rows:
            self._fill(work, bitmask, eos)
        return GrammarMask(rows, bitmask, banned)

    def _fill(self, work: list[tuple[object, int, list[int]]], bitmask: torch.Tensor,
              eos: int | None) -> None:
        """Mask rows k .. k + len(drafts) of each (matcher, k, drafts): the matcher's state,
        then its state after each draft."""
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        live, unreachable = [], []
        for m, k, drafts in work:
            if m.is_error():
                continue
            valid = m.validate_tokens(drafts) if drafts else 0
            live.append((m, k, drafts[:valid]))
            if valid < len(drafts):  # masks past the first draft it does not allow
                unreachable.append((k + valid, len(drafts) - valid))
        ptr, stride, n = bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0]
        plain = [(m, k) for m, k, drafts in live if not drafts]
        if plain:
            self._executor.unsafe_compute_mask_ptr(plain, ptr, stride, n)
        verified = [entry for entry in live if entry[2]]  # (it takes no empty draft list)
        if verified:
            self._executor.unsafe_compute_mask_ptr_with_draft_token(verified, ptr, stride, n)
        for last, count in unreachable:
            bitmask[last + 1:last + 1 + count] = bitmask[last]
        for m, k, drafts in work:
            if m.is_error():  # a token outside the grammar was forced: end the request
                logger.warning("grammar error, ending the request: %s", m.get_error())
                rows = bitmask[k:k + len(drafts) + 1]
                rows.zero_()
                if eos is not None:
                    bit = 1 << (eos % 32)
                    rows[:, eos // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit
