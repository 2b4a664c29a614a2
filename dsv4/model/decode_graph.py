"""DecodeGraphs: the decode forward compiled once per batch-size bucket (opt-in).

A pure decode step (every row one new token) runs each block as three compiled regions around
the two parts that touch the cache or depend on the data:

1. mHC pre, the attention norm, the attention's input projections and RoPE (`project_in`);
   then, eager: the cache write and read, the compressors, sparse attention (`attend_rows`);
2. inverse RoPE, the output projection, mHC post; mHC pre, the FFN norm, the gate and the
   shared expert; then, eager: the routed experts the gate picked (`MoE.dispatch`);
3. routed + shared output, mHC post.

The rows are padded to the next power of two (pad rows: token 0 at position 0; they go through
the regions only, never into the cache or to an expert, and are dropped at the end), so each
region has static shapes per bucket: inductor on the CPU, CUDA graphs (`reduce-overhead`) on
CUDA. The functions take the block as an argument, so all layers share one compiled graph per
region, bucket and layer variant (hash-routed or not); dynamo guards only their tensors, so
block attributes changed after the first compile (`set_emulate_quant`) are not seen. The eager
`run_layers` stays the reference; compiled regions fuse the element-wise chains and reduce in
their own order, so logits agree within float rounding, not bitwise (architecture.md,
"Compiled decode step").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv4.model.cache_store import BatchedLayerStore
from dsv4.model.deepseek_v4 import Block, DeepseekV4ForCausalLM
from dsv4.model.layers import upcast
from dsv4.model.mhc import hc_post

__all__ = ["DecodeGraphs"]

# graphs per region: one per bucket and layer variant; dynamo's default limit (8) is too low
_RECOMPILE_LIMIT = 64


def _attn_in(block: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, ...]:
    x, post, comb = block._mix("attn", h)
    x = block.attn_norm(x)
    q, q_lora, kv = block.attn.project_in(x, cos, sin)
    return x, q, q_lora, kv, post, comb


def _attn_out(block: Block, o: torch.Tensor, h: torch.Tensor, post: torch.Tensor,
              comb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_ids: torch.Tensor
              ) -> tuple[torch.Tensor, ...]:
    h = hc_post(block.attn.project_out(o, cos, sin), h, post, comb)
    x, post, comb = block._mix("ffn", h)
    x = block.ffn_norm(x).flatten(0, 1)  # [R, dim]
    weights, ids = block.ffn.gate(x, input_ids.flatten())
    return h, x, post, comb, weights, ids, upcast(block.ffn.shared_experts(x))


def _attn_out_hash(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _attn_out(*args)


def _ffn_out(routed: torch.Tensor, shared: torch.Tensor, h: torch.Tensor, post: torch.Tensor,
             comb: torch.Tensor) -> torch.Tensor:
    y = (routed + shared).to(h.dtype).view(*h.shape[:2], -1)
    return hc_post(y, h, post, comb)


class DecodeGraphs:
    def __init__(self, model: DeepseekV4ForCausalLM) -> None:
        if not self.supports(model):
            raise ValueError("the compiled decode step runs on one rank (no tensor, data or "
                             "expert parallelism)")
        self.model = model
        self.cuda = model.embed.weight.device.type == "cuda"
        mode = "reduce-overhead" if self.cuda else None
        import torch._dynamo.config as dynamo_config

        from dsv4.model.linear import run_dequantize_eagerly

        run_dequantize_eagerly()

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
        # guards on tensors only: checking every block attribute cost ~100 us a call
        # (profiled). What differs between layers beyond tensors is the gate's kind, hence a
        # separate function (a separate graph cache) for hash-routed blocks. On the CPU the C++
        # wrapper: the Python one makes a Python call per kernel, more than the kernels cost.
        opts = {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe,
                "cpp_wrapper": not self.cuda}
        self.attn_in, self.attn_out, self.attn_out_hash, self.ffn_out = (
            torch.compile(fn, dynamic=False, mode=mode, options=opts)
            for fn in (_attn_in, _attn_out, _attn_out_hash, _ffn_out))

    @staticmethod
    def supports(model: DeepseekV4ForCausalLM) -> bool:
        return model.parallel.config.world_size == 1

    @staticmethod
    def bucket(rows: int) -> int:
        return 1 << (rows - 1).bit_length()

    def run_layers(self, input_ids: torch.Tensor, positions: torch.Tensor,
                   layer_store: Callable[[int], BatchedLayerStore]) -> torch.Tensor:
        """The trunk for R decode rows: input_ids [1, R] at positions [R], each layer's batched
        cache store from layer_store(i) -> streams [1, R, hc_mult, dim] (as run_layers)."""
        model, rows = self.model, input_ids.shape[1]
        pad = self.bucket(rows) - rows
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        ids, pos = F.pad(input_ids, (0, pad)), F.pad(positions, (0, pad))
        x = model.embed(ids, model.compute_dtype)
        h = x.unsqueeze(2).expand(-1, -1, model.config.hc_mult, -1).contiguous()
        for i, block in enumerate(model.layers):
            cos, sin = block.attn.rope.step(pos)
            x, q, q_lora, kv, post, comb = self.attn_in(block, h, cos, sin)
            o = block.attn.attend_rows(x[0, :rows], q[0, :rows], q_lora[0, :rows],
                                       kv[0, :rows], positions, layer_store(i))
            o = F.pad(o, (0, 0, 0, 0, 0, pad)).unsqueeze(0)
            attn_out = self.attn_out_hash if block.ffn.gate.is_hash else self.attn_out
            h, x, post, comb, weights, expert_ids, shared = attn_out(
                block, o, h, post, comb, cos, sin, ids)
            routed = block.ffn.dispatch(x[:rows], weights[:rows], expert_ids[:rows])
            h = self.ffn_out(F.pad(routed, (0, 0, 0, pad)), shared, h, post, comb)
        return h[:, :rows]
