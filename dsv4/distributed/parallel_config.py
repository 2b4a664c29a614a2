"""ParallelConfig: how many ranks, and which part of the model each one holds.

The layout is vLLM's: world = tensor_parallel_size x data_parallel_size ranks, rank r in data-
parallel group r // tp at tensor-parallel place r % tp.

- Attention, the embedding and the head are split over the tensor-parallel group: query heads,
  indexer heads and output groups (column / row split as in DeepSeek's reference), vocabulary
  rows. V4's single K=V head, the compressors and the mHC maps are replicated.
- With data_parallel_size > 1 each data-parallel group runs its own requests and its own KV
  cache (DP-attention); every MoE layer then runs over all ranks on the tokens of all groups.
- The routed experts are split over all world ranks: into expert_parallel_size groups of whole
  experts (EP; enable_expert_parallel alone means EP over the whole world, as in vLLM; a smaller
  size, as SGLang's --ep-size, leaves world / EP ranks to split each expert's intermediate
  width), or without EP every expert's width over all ranks (expert TP). Rank r holds expert
  group r // expert_tp, slice r % expert_tp. The router, its bias and the shared expert are
  replicated (the reference keeps the shared expert
  whole on each rank; its width is not block-aligned at Pro's 16-way split).

`check(model_config)` refuses, with the reason named, a layout the checkpoint cannot be cut into:
counts that do not divide, or an FP8 (128x128 blocks) / FP4 (1x32 blocks) weight cut across a
scale block.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.config import ModelConfig

__all__ = ["ParallelConfig", "ParallelLayoutError"]


class ParallelLayoutError(ValueError):
    """A parallel layout that the model cannot be split into."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    # 0: the whole world under enable_expert_parallel, else 1; > 1 turns EP on by itself
    expert_parallel_size_override: int = 0

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParallelLayoutError(f"{name} must be a positive integer, got {value!r}")
        ep = self.expert_parallel_size_override
        if not isinstance(ep, int) or isinstance(ep, bool) or ep < 0:
            raise ParallelLayoutError(f"expert_parallel_size must be a positive integer, "
                                      f"got {ep!r}")
        if ep and self.world_size % ep:
            raise ParallelLayoutError(
                f"expert_parallel_size={ep} does not divide the world of {self.world_size} "
                f"ranks (tensor_parallel_size x data_parallel_size)")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size

    @property
    def expert_parallel_size(self) -> int:
        """Groups the routed experts are spread over (whole experts each)."""
        if self.expert_parallel_size_override:
            return self.expert_parallel_size_override
        return self.world_size if self.enable_expert_parallel else 1

    @property
    def expert_tensor_parallel_size(self) -> int:
        """Ways each routed expert's intermediate width is split (world / EP)."""
        return self.world_size // self.expert_parallel_size

    def expert_place(self, rank: int) -> tuple[int, int]:
        """(expert group, slice of each expert's width) that world rank `rank` holds."""
        moe_tp = self.expert_tensor_parallel_size
        return rank // moe_tp, rank % moe_tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tensor_parallel_size

    def dp_rank(self, rank: int) -> int:
        return rank // self.tensor_parallel_size

    def tp_group(self, rank: int) -> list[int]:
        """World ranks of the tensor-parallel group that holds `rank`."""
        first = self.dp_rank(rank) * self.tensor_parallel_size
        return list(range(first, first + self.tensor_parallel_size))

    def dp_group(self, rank: int) -> list[int]:
        """World ranks at the same tensor-parallel place as `rank`, one per data-parallel group."""
        return list(range(self.tp_rank(rank), self.world_size, self.tensor_parallel_size))

    def describe(self) -> str:
        moe = f"EP {self.expert_parallel_size} x expert TP {self.expert_tensor_parallel_size}"
        return (f"TP {self.tensor_parallel_size} x DP {self.data_parallel_size} "
                f"= {self.world_size} ranks, MoE {moe}")

    def check(self, c: ModelConfig) -> None:
        """Raise ParallelLayoutError naming every split that `c` does not allow."""
        tp, moe_tp, ep = (self.tensor_parallel_size, self.expert_tensor_parallel_size,
                          self.expert_parallel_size)
        problems = []

        def divides(what: str, value: int, parts: int, flag: str) -> None:
            if value % parts:
                problems.append(f"{what}={value} is not divisible by {flag}={parts}")

        divides("num_attention_heads", c.num_attention_heads, tp, "tensor_parallel_size")
        divides("o_groups", c.o_groups, tp, "tensor_parallel_size")
        divides("index_n_heads", c.index_n_heads, tp, "tensor_parallel_size")
        divides("vocab_size", c.vocab_size, tp, "tensor_parallel_size")
        divides("n_routed_experts", c.n_routed_experts, ep, "expert_parallel_size")
        divides("moe_intermediate_size", c.moe_intermediate_size, moe_tp,
                "expert tensor parallel size (world / expert_parallel_size)")
        if problems:
            raise ParallelLayoutError(f"cannot split {self.describe()}: " + "; ".join(problems))
        fp8 = c.weight_dtype == "fp8"
        # (tensor, its width per rank along the split axis, stored as FP8?)
        cuts = []
        if tp > 1:
            cuts += [("attn.wq_b rows", c.num_attention_heads * c.head_dim // tp, fp8),
                     ("attn.wo_a rows", c.o_groups * c.o_lora_rank // tp, fp8),
                     ("attn.wo_b columns", c.o_groups * c.o_lora_rank // tp, fp8),
                     ("attn.indexer.wq_b rows", c.index_n_heads * c.index_head_dim // tp, fp8)]
        if moe_tp > 1 and c.expert_dtype in ("fp4", "fp8"):
            width = c.moe_intermediate_size // moe_tp
            cuts += [("ffn.experts.*.w1/w3 rows", width, c.expert_dtype == "fp8"),
                     ("ffn.experts.*.w2 columns", width, c.expert_dtype == "fp8")]
            if c.expert_dtype == "fp4" and width % 32:
                problems.append(f"ffn.experts.*.w2 columns: {width} per rank is not a whole "
                                "number of FP4 scale blocks (32)")
        for what, width, is_fp8 in cuts:
            if is_fp8 and width % 128:
                problems.append(f"{what}: {width} per rank is not a whole number of FP8 "
                                "scale blocks (128)")
        if problems:
            raise ParallelLayoutError(f"cannot split {self.describe()} on block boundaries: "
                                      + "; ".join(problems))
