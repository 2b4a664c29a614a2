"""Rolling back rejected draft tokens (the ground speculative decoding stands on).

A row verifies its last sampled token and k drafts in one step; only the first a drafts are
accepted. After ``ModelRunner.rollback`` the compressor state (CSA and indexer: previous window
and pending rows; HCA: pending rows) equals that of a run that computed only the accepted
tokens, also when a CSA (ratio 4) or HCA (ratio 8) window completes inside the rejected drafts,
and the next step's logits equal that run's. The runner is driven directly with hand-built
batches (no scheduler): fp64, QAT rounding on.
"""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err, tiny_config
from dsv4 import SamplingParams
from dsv4.engine.batch import ScheduledBatch
from test_llm_engine import make_llm, prompts_of

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


class Rows:
    """One request driven step by step through an engine's runner and block manager."""

    def __init__(self, engine, rid: str) -> None:
        self.engine, self.rid = engine, rid
        self.bm, self.runner = engine.block_manager, engine.runner

    def step(self, tokens: list[int], start: int, drafts: int = 0) -> torch.Tensor:
        """Feed ``tokens`` at positions start..; returns the logits of every position."""
        assert self.bm.allocate(self.rid, start, len(tokens))
        batch = ScheduledBatch(
            req_ids=[self.rid], token_ids=[tokens], num_computed_tokens=[start],
            block_tables={k: [v] for k, v in self.bm.block_tables(self.rid).items()},
            swa_block_offsets=[self.bm.swa_block_offset(self.rid)],
            state_slots=[self.bm.state_slot(self.rid)], do_sample=[False],
            num_draft_tokens=[drafts])
        seen = {}
        model = self.runner.model
        real = model.run_layers

        def run_layers(ids, segments):
            seen["h"] = real(ids, segments)
            return seen["h"]

        model.run_layers = run_layers
        try:
            self.runner.execute(batch)
        finally:
            model.run_layers = real
        return model.logits(seen["h"])[0]

    def states(self) -> dict[str, list[torch.Tensor]]:
        """Copies of every compressor state of this request's slot."""
        cache, slot = self.runner.kv_cache, self.bm.state_slot(self.rid)
        return {key: [t[:, slot].clone() for t in pair] for key, pair in cache.states.items()}


def live_rows(states: dict[str, list[torch.Tensor]], pos: int, hca: int, dims: dict[str, int]
              ) -> dict[str, list[torch.Tensor]]:
    """What the next token at ``pos`` reads: pending rows [pos - pos % m, pos) and, for CSA,
    the previous window's first halves."""
    out = {}
    for key, pair in states.items():
        m = 4 if key.startswith("csa") else hca
        off, n = (m if m == 4 else 0), pos % m
        rows = [t[:, off:off + n] for t in pair]
        if m == 4 and pos >= m:
            rows += [t[:, :m, :dims[key]] for t in pair]
        out[key] = rows
    return out


@pytest.mark.parametrize("accepted", [0, 1, 2, 3])
def test_rollback_equals_a_run_without_the_rejected_drafts(tiny_checkpoint, accepted):
    """Start 29: the step holds positions 29..32; CSA and HCA windows complete at 31. Accepting
    0 or 1 drafts rejects that completion; 2 keeps it and rejects 32; 3 keeps all."""
    path = tiny_checkpoint(tiny_config(index_topk=2))
    prompt = prompts_of([29], seed=3)[0]
    drafts = [11, 222, 333]
    cfg = tiny_config()
    dims = {"csa": cfg.head_dim, "csa_index": cfg.index_head_dim, "hca": cfg.head_dim}
    spec = Rows(make_llm(path, dtype=torch.float64).engine, "s")
    spec.step(prompt[:21], 0)
    spec.step(prompt[21:], 21)  # positions 21..28: windows pending across chunks
    # the speculative step: the last sampled token (at 29) and three drafts (30..32)
    last = 7
    spec.step([last, *drafts], 29, drafts=3)
    end = 30 + accepted
    spec.runner.rollback("s", end)
    cold = Rows(make_llm(path, dtype=torch.float64).engine, "c")
    cold.step(prompt + [last] + drafts[:accepted], 0)
    got = live_rows(spec.states(), end, cfg.hca_ratio, dims)
    want = live_rows(cold.states(), end, cfg.hca_ratio, dims)
    for key in want:
        for mine, theirs in zip(got[key], want[key]):
            assert mine.shape == theirs.shape
            if theirs.numel():
                assert rel_err(mine, theirs) <= 1e-12, key
    # and the next token computes what the cold run computes
    nxt = [41, 42]
    assert rel_err(spec.step(nxt, end), cold.step(nxt, end)) <= 2.0 ** -22
