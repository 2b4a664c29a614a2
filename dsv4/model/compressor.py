"""Compressor: gated pooling of `ratio` consecutive tokens into one KV entry (architecture.md 2.5).

Ratio 4 (CSA) overlaps windows: entry w pools the first halves ("A") of window w-1's tokens and
the second halves ("B") of window w's tokens, 8 slots, softmax per channel. Ratio 128 (HCA) pools
its own window only. Entries are RMS-normed, get RoPE at position ratio*w, and are rounded the way
the reference's QAT path does (FP8 nope dims for the main KV; Hadamard + FP4 for indexer keys).
Works on any chunking: tokens of an unfinished window wait in the compressor's store.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.cache_store import BatchedCompressorStore, CompressorStore
from dsv4.model.layers import RMSNorm, RotaryEmbedding, upcast
from dsv4.model.linear import Linear
from dsv4.ops import OPS
from dsv4.quant import fake_quant_fp4, hadamard

__all__ = ["Compressor", "window_pool"]


def window_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Gated pooling of windows: kv, score [..., slots, D] -> [..., D] (softmax over the slots,
    per channel; the `window_pool` op's reference)."""
    return (kv * score.softmax(dim=-2)).sum(dim=-2)


class Compressor(nn.Module):
    def __init__(self, config: ModelConfig, ratio: int, head_dim: int, rotate: bool,
                 rope: RotaryEmbedding) -> None:
        super().__init__()
        self.ratio, self.head_dim, self.rotate = ratio, head_dim, rotate
        self.overlap = ratio == 4
        self.rope_dim = config.qk_rope_head_dim
        width = (1 + self.overlap) * head_dim
        self.ape = nn.Parameter(torch.empty(ratio, width), requires_grad=False)
        # bf16 in the checkpoint; the reference computes these projections in fp32
        self.wkv = Linear(config.hidden_size, width)
        self.wgate = Linear(config.hidden_size, width)
        self.norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.rope = rope
        self.emulate_quant = True

    def forward(self, x: torch.Tensor, start_pos: int, state: CompressorStore) -> None:
        """Consume x [B, T, dim] at positions start_pos.. and append finished entries to state.

        The unfinished window holds start_pos % ratio tokens; CSA's previous window exists from
        the second window on. Both follow from the position, so a reused state slot needs no
        reset."""
        m = self.ratio
        xf = upcast(x)
        kv = self.wkv(xf)
        positions = torch.arange(start_pos, start_pos + x.shape[1], device=x.device)
        score = self.wgate(xf) + self.ape[positions % m]
        num_pending = start_pos % m
        pending = state.pending(num_pending)
        if pending is not None:
            kv = torch.cat([pending[0], kv], dim=1)
            score = torch.cat([pending[1], score], dim=1)
        state.observe(start_pos - num_pending, kv, score)
        first_window = (start_pos - num_pending) // m
        n_win = kv.shape[1] // m
        cut = n_win * m
        state.set_pending(kv[:, cut:], score[:, cut:])
        if n_win == 0:
            return
        kv = kv[:, :cut].unflatten(1, (n_win, m))  # [B, n_win, m, width]
        score = score[:, :cut].unflatten(1, (n_win, m))
        if self.overlap:
            prev = state.previous() if first_window > 0 else None
            state.set_previous(kv[:, -1], score[:, -1])
            kv = self._overlap(kv, None if prev is None else prev[0], 0.0)
            score = self._overlap(score, None if prev is None else prev[1], float("-inf"))
        pos = (first_window + torch.arange(n_win, device=x.device)) * m
        state.append(self._finish(kv, score, pos, x.dtype))

    def decode_step(self, x: torch.Tensor, positions: torch.Tensor,
                    state: BatchedCompressorStore) -> None:
        """One new token for each of R sequences: x [R, dim] at positions [R] (any mix).

        `state` is a batched store (the engine's paged one): write_token puts the token into its
        sequence's unfinished window; windows that complete here are pooled from
        completed_windows() (already in the [R_done, slots, D] layout of _overlap) and appended.
        Rows of one sequence at consecutive positions (a verified draft run) are in successive
        waves, consumed in turn: a window completed by one wave is pooled before the next wave
        writes the following window.
        """
        m = self.ratio
        xf = upcast(x)
        kv_all, score_all = self.wkv(xf), self.wgate(xf) + self.ape[positions % m]
        for wave in range(state.num_waves):
            state.write_token(kv_all, score_all, wave)
            done = state.completing_rows(wave)
            if done is None:
                continue
            kv, score = state.completed_windows(done, self.head_dim)
            starts = positions[done] + 1 - m
            entries = self._finish(kv.unsqueeze(1), score.unsqueeze(1), starts.unsqueeze(1),
                                   x.dtype).squeeze(1)
            state.append_completed(done, entries, wave)

    def _finish(self, kv: torch.Tensor, score: torch.Tensor, pos: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        """Pool [..., slots, D] windows, then norm, RoPE at the window start, QAT rounding."""
        pooled = OPS.window_pool(kv, score)  # [..., D]
        entries = self.norm(pooled.to(dtype))
        cos, sin = self.rope(pos)
        entries = OPS.rope(entries, cos, sin)
        if self.emulate_quant:
            if self.rotate:
                entries = fake_quant_fp4(hadamard(entries))
            else:
                entries = OPS.kv_quant(entries, self.rope_dim)
        return entries

    def _overlap(self, t: torch.Tensor, prev: torch.Tensor | None, fill: float) -> torch.Tensor:
        """[B, n, m, 2D] -> [B, n, 2m, D]: A-halves of the previous window, then own B-halves."""
        d, m = self.head_dim, self.ratio
        out = t.new_full((t.shape[0], t.shape[1], 2 * m, d), fill)
        out[:, :, m:] = t[..., d:]
        out[:, 1:, :m] = t[:, :-1, :, :d]
        if prev is not None:
            out[:, 0, :m] = prev[..., :d]
        return out
