"""ScheduledBatch: what the scheduler hands the model runner for one step (CPU ints only).

A plain picklable dataclass, so it can be broadcast to TP/EP followers. Rows are requests in
scheduling order; request i feeds ``token_ids[i]`` at positions ``num_computed_tokens[i] + j``
and, if ``do_sample[i]``, gets one sampled token back. Every block table is a snapshot (a copy);
the sampling fields (params, prompt/output ids) are references read only by the driver rank,
valid until ``Scheduler.update_from_output``. It builds no tensors; the one it may carry is the
grammar bitmask of the constrained rows, which the driver computes and every rank applies.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from dsv4.sampling_params import SamplingParams

__all__ = ["GrammarMask", "ScheduledBatch"]


@dataclass
class GrammarMask:
    """Token masks of one step's sampling positions under a grammar (CPU). Positions are laid
    out as ``SamplingMetadata.from_batch`` lays them out: one per sampling row, in
    sample_indices order, and k + 1 for a row that verifies k drafts. Built by
    ``dsv4.engine.structured_output``, applied by ``Sampler.apply_grammar``."""

    rows: list[int]  # sampling positions under a grammar, increasing
    bitmask: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32: bit t of a row = token t allowed
    banned: list[tuple[int, int]] = field(default_factory=list)  # (sampling position, token id)


@dataclass
class ScheduledBatch:
    # ---- forward inputs (every rank) --------------------------------------------------------
    # request ids in row order (running requests first, then newly admitted ones)
    req_ids: list[str] = field(default_factory=list)
    # input token ids scheduled per request: a prefill chunk, or one token when decoding
    token_ids: list[list[int]] = field(default_factory=list)
    # tokens already in the cache before this step = position of token_ids[i][0]; 0 for new
    # and for preempted-then-resumed requests (the runner must overwrite, not read, their cache)
    # unless they start after a cached prefix (see boundary_blocks)
    num_computed_tokens: list[int] = field(default_factory=list)
    # per cache kind ("swa" / "csa" / "hca"), per request: block ids in logical order. csa / hca
    # start at logical block 0; swa starts at logical block swa_block_offsets[i] (earlier ones
    # were released). Token at position p: swa entry p, csa entry p // 4, hca entry p // ratio,
    # each in logical block (entry * ratio) // block_size.
    block_tables: dict[str, list[list[int]]] = field(default_factory=dict)
    # logical index of the first block in block_tables["swa"][i]
    swa_block_offsets: list[int] = field(default_factory=list)
    # compressor-state slot per request (slot 0 is the null slot for padding lanes)
    state_slots: list[int] = field(default_factory=list)
    # per request: the swa block whose kept CSA boundary state (previous-window rows) must be
    # copied into its state slot before this step: the first step after a prefix-cache hit
    # (num_computed_tokens[i] is then the hit's end); 0 otherwise
    boundary_blocks: list[int] = field(default_factory=list)
    # per request: how many of token_ids[i] (its last ones) are draft tokens that may be
    # rejected (speculative decoding); the runner keeps what rolling them back needs. Empty or
    # 0: none
    num_draft_tokens: list[int] = field(default_factory=list)
    # speculative decoding (empty lists when off), per request: how many draft tokens the
    # runner's MTP block proposes for the row's next step (0: none; its blocks were allocated
    # for the draft positions past this step), and the known token after the scheduled ones
    # (-1 where the step samples it): the MTP block reads (stream at p, token at p + 1)
    num_propose_tokens: list[int] = field(default_factory=list)
    next_token_ids: list[int] = field(default_factory=list)
    # True when the request's last scheduled token is its last known token: sample one token
    # from the logits at that position. False for a prefill chunk that does not end the prompt.
    do_sample: list[bool] = field(default_factory=list)
    # requests finished or aborted since the previous batch, so a runner that keeps
    # per-request state can drop it (their blocks and slots may already be reused here)
    finished_req_ids: list[str] = field(default_factory=list)
    # requests preempted since the previous batch: their cache is gone; they come back later
    # as rows with num_computed_tokens == 0 (recompute)
    preempted_req_ids: list[str] = field(default_factory=list)
    # ---- sampling inputs (driver rank only; references into the Request) -----------------------
    # per request: its SamplingParams
    sampling_params: list[SamplingParams] = field(default_factory=list)
    # per request: index of the output token sampled this step (= outputs so far); keys
    # seeded noise, so a seeded request samples the same tokens in any batch or after preemption
    num_output_tokens: list[int] = field(default_factory=list)
    # per request: prompt ids (repetition penalty) and output ids so far (all penalties)
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    output_token_ids: list[list[int]] = field(default_factory=list)
    # per request: its EOS id (masked with stop_token_ids while it is short of min_tokens)
    eos_token_ids: list[int | None] = field(default_factory=list)
    # speculating engines: the seed of the step's unseeded draws (acceptance tests, noise), so
    # every rank of a tensor-parallel group accepts the same drafts; None: the global RNG
    step_seed: int | None = None
    # token masks of the rows under a grammar (set by the engine before the step; all ranks);
    # a single-process engine gives a Future of them, computed while the model runs
    grammar: GrammarMask | Future | None = None

    # ---- derived views ---------------------------------------------------------------------
    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    @property
    def is_empty(self) -> bool:
        return not self.req_ids

    @property
    def num_scheduled_tokens(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def sample_indices(self) -> list[int]:
        """Rows that sample, in order (the runner returns logits for these rows only)."""
        return [i for i, sample in enumerate(self.do_sample) if sample]

    def positions(self) -> list[int]:
        """Flat positions of all scheduled tokens, row after row."""
        return [p for start, ids in zip(self.num_computed_tokens, self.token_ids, strict=True)
                for p in range(start, start + len(ids))]

    def num_drafts(self, i: int) -> int:
        """Draft tokens among row i's scheduled tokens."""
        return self.num_draft_tokens[i] if self.num_draft_tokens else 0

    def logits_indices(self) -> list[int]:
        """Flat token indices whose logits the sampling rows need, row after row: the last
        scheduled token, and for a row with k drafts the k + 1 positions that verify them."""
        out, end = [], 0
        for i, (ids, sample) in enumerate(zip(self.token_ids, self.do_sample, strict=True)):
            end += len(ids)
            if sample:
                out.extend(range(end - 1 - self.num_drafts(i), end))
        return out
