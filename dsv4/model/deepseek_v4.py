"""DeepseekV4ForCausalLM: embedding -> blocks wrapped in mHC -> hc_head -> norm -> head.

Module and parameter names are the official checkpoint's (architecture.md 4.1), so an official
state dict loads by name. `forward(input_ids)` returns logits for every position with no cache;
`forward(input_ids, cache)` continues a SequenceCache from `cache.num_tokens` (any chunk size).
The MTP block (architecture.md 2.8) drafts logits for token i+2 from the pre-hc_head streams.

Built with a dsv4.distributed.ParallelContext, the model is one rank's part: attention and MoE
split as their modules say, and the embedding and head split by vocabulary rows over the
tensor-parallel group (a lookup outside the rank's rows gives zeros, one all-reduce joins them;
the head's partial logits are joined by one all-gather). Parameter names stay the checkpoint's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import ModelConfig
from dsv4.distributed.parallel_context import ParallelContext
from dsv4.model.attention import Attention, Segment, segment_positions
from dsv4.model.layers import RMSNorm, RotaryEmbedding
from dsv4.model.linear import Linear, split
from dsv4.model.mhc import hc_head
from dsv4.model.moe import MoE
from dsv4.model.sequence_cache import SequenceCache
from dsv4.ops import OPS

__all__ = ["Block", "MTPBlock", "DeepseekV4ForCausalLM", "head_matmul"]


def _fp32_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=torch.float32), requires_grad=False)


_HEAD_MM_ROWS = 16  # up to this many rows, an fp32 head on the CPU goes through torch.mm


def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., dim] @ weight [V, dim].T -> [..., V]. On the CPU, an fp32 head with the few rows
    of a decode or verify step is computed as weight @ x.T over at least two columns: MKL's
    GEMM streams the head at memory speed there, where linear() takes a path 2-3x slower for 2
    to 8 rows (and a single row's GEMV is no faster); BENCHMARKS.md, "The head on the CPU".
    More rows, other dtypes and devices: linear()."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if x.device.type != "cpu" or x.dtype != torch.float32 or n > _HEAD_MM_ROWS:
        return F.linear(x, weight)
    if n == 1:
        rows = rows.repeat(2, 1)
    out = torch.mm(weight, rows.t()).t()[:n].contiguous()
    return out.view(*x.shape[:-1], weight.shape[0])


class Block(nn.Module):
    def __init__(self, config: ModelConfig, ratio: int, is_hash: bool,
                 rope: RotaryEmbedding | None = None,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.config = config
        self.attn = Attention(config, ratio, rope, parallel)
        self.ffn = MoE(config, is_hash, parallel)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        n = config.hc_mult
        mix, width = (2 + n) * n, n * config.hidden_size
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", _fp32_param(mix, width))
            setattr(self, f"hc_{site}_base", _fp32_param(mix))
            setattr(self, f"hc_{site}_scale", _fp32_param(3))

    def _mix(self, site: str, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        return OPS.hc_pre(h, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_scale"),
                      getattr(self, f"hc_{site}_base"), c.hc_sinkhorn_iters, c.hc_eps,
                      c.rms_norm_eps)

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor, segments: list[Segment],
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, T, hc_mult, dim] -> same shape; segments carry this layer's cache stores."""
        x, post, comb = self._mix("attn", h)
        h = OPS.hc_post(self.attn(self.attn_norm(x), segments, positions), h, post, comb)
        x, post, comb = self._mix("ffn", h)
        return OPS.hc_post(self.ffn(self.ffn_norm(x), input_ids), h, post, comb)


class MTPBlock(Block):
    """Multi-token-prediction head: one sliding-window block on top of the trunk's streams."""

    def __init__(self, config: ModelConfig, rope: RotaryEmbedding | None = None,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__(config, ratio=0, is_hash=False, rope=rope, parallel=parallel)
        fmt = "fp8" if config.weight_dtype == "fp8" else "dense"
        sdt = torch.float8_e8m0fnu if config.scale_fmt == "ue8m0" else torch.float32
        d, n = config.hidden_size, config.hc_mult
        self.e_proj = Linear(d, d, fmt, sdt)
        self.h_proj = Linear(d, d, fmt, sdt)
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.hc_head_fn, self.hc_head_base = _fp32_param(n, n * d), _fp32_param(n)
        self.hc_head_scale = _fp32_param(1)


class VocabParallelEmbedding(nn.Embedding):
    """The embedding rows [rank * V/tp, (rank + 1) * V/tp) of the vocabulary; whole when tp = 1."""

    def __init__(self, vocab_size: int, dim: int, parallel: ParallelContext) -> None:
        self.tp = parallel.tp
        super().__init__(vocab_size // self.tp.size, dim)
        self.shards = {"weight": split(0, self.tp.size, self.tp.rank)}
        self.first = self.tp.rank * (vocab_size // self.tp.size)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Embeddings of ids, in `dtype` (default: the weight's)."""
        dtype = dtype or self.weight.dtype
        if self.tp.size == 1:
            return super().forward(ids).to(dtype)
        local = ids - self.first
        outside = (local < 0) | (local >= self.num_embeddings)
        out = super().forward(local.masked_fill(outside, 0)).to(dtype)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class DeepseekV4ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, emulate_quant: bool = True,
                 with_mtp: bool = True, parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.config = config
        self.parallel = par = parallel or ParallelContext.single()
        d, n = config.hidden_size, config.hc_mult
        self.embed = VocabParallelEmbedding(config.vocab_size, d, par)
        # one RoPE per flavour for the whole model: a step's cos/sin are computed once, not
        # once per layer (RotaryEmbedding.step)
        ropes = {c: RotaryEmbedding(config, compressed=c) for c in (False, True)}
        self.layers = nn.ModuleList(
            Block(config, r, config.is_hash_layer(i), ropes[r > 0], par)
            for i, r in enumerate(config.compress_ratios))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.head = nn.Linear(d, config.vocab_size // par.tp.size, bias=False)
        self.head.shards = {"weight": split(0, par.tp.size, par.tp.rank)}
        self.hc_head_fn, self.hc_head_base = _fp32_param(n, n * d), _fp32_param(n)
        self.hc_head_scale = _fp32_param(1)
        self.mtp = nn.ModuleList(
            MTPBlock(config, ropes[False], par)
            for _ in range(config.num_nextn_predict_layers if with_mtp else 0))
        for p in self.parameters():
            p.requires_grad_(False)
        self.compute_dtype = torch.float32
        self.set_emulate_quant(emulate_quant)

    def set_emulate_quant(self, on: bool) -> None:
        """Turn the reference's FP8/FP4 KV and indexer rounding on (default) or off."""
        self.emulate_quant = on
        for block in [*self.layers, *self.mtp]:
            block.attn.set_emulate_quant(on)

    def new_cache(self) -> SequenceCache:
        return SequenceCache.empty(self.config, len(self.layers) + len(self.mtp))

    def hidden_streams(self, input_ids: torch.Tensor, cache: SequenceCache) -> torch.Tensor:
        """Run the trunk on a chunk; returns the pre-hc_head streams [B, T, hc_mult, dim]."""
        start, t = cache.num_tokens, input_ids.shape[1]
        h = self.run_layers(input_ids, lambda i: [Segment(0, t, start, cache.layers[i])])
        cache.num_tokens = start + t
        return h

    def run_layers(self, input_ids: torch.Tensor,
                   layer_segments: Callable[[int], list[Segment]]) -> torch.Tensor:
        """The trunk over input_ids [B, T] whose T axis is split into segments (per layer, by
        `layer_segments(layer_idx)`); returns the streams [B, T, hc_mult, dim]."""
        self.parallel.begin_step(input_ids)
        x = self.embed(input_ids, self.compute_dtype)
        h = x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        positions = None
        for i, block in enumerate(self.layers):
            segments = layer_segments(i)
            if positions is None:  # the same for every layer: build once per step
                positions = segment_positions(segments, input_ids.shape[1], input_ids.device)
            h = block(h, input_ids, segments, positions)
        return h

    def logits(self, h: torch.Tensor, owner: nn.Module | None = None) -> torch.Tensor:
        """fp32 logits of streams h; ``owner`` holds hc_head and the norm (an MTP block)."""
        owner = owner or self
        c = self.config
        x = hc_head(h, owner.hc_head_fn, owner.hc_head_scale, owner.hc_head_base,
                    c.hc_eps, c.rms_norm_eps)
        x = owner.norm(x)
        out = head_matmul(x, self.head.weight.to(x.dtype))
        return self.parallel.tp.all_gather(out.float(), dim=-1)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: SequenceCache | None = None
                ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (fp32)."""
        cache = cache if cache is not None else self.new_cache()
        return self.logits(self.hidden_streams(input_ids, cache))

    def mtp_streams(self, h: torch.Tensor, next_ids: torch.Tensor,
                    segments: list[Segment], positions: torch.Tensor | None = None,
                    depth: int = 0) -> torch.Tensor:
        """The MTP block over streams h [B, T, hc_mult, dim] at positions i (the trunk's, or
        the block's own output for a deeper draft) and the embeddings of t[i+1] (next_ids
        [B, T]); returns its output streams, whose logits draft t[i+2]. ``segments`` carry the
        block's own (sliding-window) cache layer, index len(layers) + depth."""
        block: MTPBlock = self.mtp[depth]
        self.parallel.begin_step(next_ids)  # the MoE of a DP-attention model routes these ids
        e = block.e_proj(block.enorm(self.embed(next_ids, h.dtype)))
        x = e.unsqueeze(2) + block.h_proj(block.hnorm(h))
        if positions is None:
            positions = segment_positions(segments, next_ids.shape[1], next_ids.device)
        return block(x, next_ids, segments, positions)

    @torch.inference_mode()
    def mtp_logits(self, h: torch.Tensor, next_ids: torch.Tensor, start_pos: int,
                   cache: SequenceCache, depth: int = 0) -> torch.Tensor:
        """Draft logits for t[i+2] from trunk streams h at positions i and embeddings of t[i+1].

        h [B, T, hc_mult, dim] at positions start_pos..; next_ids [B, T]."""
        seg = Segment(0, next_ids.shape[1], start_pos, cache.layers[len(self.layers) + depth])
        x = self.mtp_streams(h, next_ids, [seg], depth=depth)
        return self.logits(x, owner=self.mtp[depth])
