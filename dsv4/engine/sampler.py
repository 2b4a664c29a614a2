"""Sampler: next-token choice from logits, per request, on any torch device.

Order (vLLM v1): logprobs from the raw logits -> logit_bias and min_tokens (EOS and stop ids
masked while a row is short of min_tokens) -> penalties (repetition, presence, frequency) ->
grammar masks (only the rows under a grammar are touched: their disallowed tokens get -inf) ->
greedy rows take the argmax -> other rows: temperature, min-p, top-k, top-p, then Gumbel-max
sampling (argmax of probs / Exp(1) noise). A seeded row draws its noise from a generator keyed on
(seed, output index), so it samples the same tokens alone, in any batch, or after preemption;
unseeded rows share the global RNG. A batch that is all greedy skips everything but the argmax
(and penalties / logprobs when asked). It does not know about blocks, requests or text.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from dsv4.engine.batch import GrammarMask, ScheduledBatch
from dsv4.sampling_params import SamplingParams

__all__ = ["LogprobsTensors", "Sampler", "SamplerOutput", "SamplingMetadata"]

_MASK64 = (1 << 64) - 1


def _mix_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): a well-spread 63-bit generator seed per sampled token."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass
class SamplingMetadata:
    """Per-row sampling inputs, already on the logits' device. Build with :meth:`build`."""

    temperature: torch.Tensor  # [num_reqs] fp32; 1.0 on greedy rows (unused there)
    is_greedy: torch.Tensor  # [num_reqs] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [num_reqs] int64, vocab_size where off; None: no row uses it
    top_p: torch.Tensor | None  # [num_reqs] fp32, 1.0 where off
    min_p: torch.Tensor | None  # [num_reqs] fp32, 0.0 where off
    seeds: list[int | None]  # per row; None: global RNG
    output_index: list[int]  # per row: index of the output token being sampled
    # penalties (None when no row has one)
    presence_penalty: torch.Tensor | None  # [num_reqs] fp32
    frequency_penalty: torch.Tensor | None  # [num_reqs] fp32
    repetition_penalty: torch.Tensor | None  # [num_reqs] fp32
    output_token_ids: list[Sequence[int]] | None  # per row, tokens generated so far
    prompt_token_ids: list[Sequence[int]] | None  # per row
    max_num_logprobs: int | None  # top-N to return; None: no logprobs
    # (row, token id) index tensors and values to add (logit_bias) / mask (min_tokens); None: none
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None = None
    # rows under a grammar and their [rows, ceil(vocab / 32)] int32 allowed-token bitmasks
    grammar_rows: torch.Tensor | None = None
    grammar_bitmask: torch.Tensor | None = None
    # unseeded rows draw from a generator seeded with this instead of the global RNG (the
    # ranks of a speculating tensor-parallel group must accept the same drafts); None: global
    step_seed: int | None = None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        device: torch.device | str,
        output_token_ids: Sequence[Sequence[int]] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        output_index: Sequence[int] | None = None,
        vocab_size: int | None = None,
        eos_token_ids: Sequence[int | None] | None = None,
        grammar: GrammarMask | None = None,
    ) -> SamplingMetadata:
        """Rows follow ``params``. ``output_token_ids`` / ``prompt_token_ids`` are needed only
        for penalties; ``output_index`` defaults to ``len(output_token_ids[i])`` (else 0);
        ``eos_token_ids`` (per row) are masked with the stop ids while a row is short of
        min_tokens."""
        n = len(params)
        greedy = [p.is_greedy for p in params]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        big_k = vocab_size if vocab_size is not None else 1 << 62
        use_k = any(p.top_k > 0 and not g for p, g in zip(params, greedy, strict=True))
        use_p = any(p.top_p < 1.0 and not g for p, g in zip(params, greedy, strict=True))
        use_min_p = any(p.min_p > 0.0 and not g for p, g in zip(params, greedy, strict=True))
        use_pen = any(p.has_penalties for p in params)
        if output_index is None:
            output_index = ([len(ids) for ids in output_token_ids] if output_token_ids is not None
                            else [0] * n)
        if use_pen and output_token_ids is None:
            raise ValueError("penalties need output_token_ids")
        if use_pen and prompt_token_ids is None and any(p.repetition_penalty != 1.0
                                                        for p in params):
            raise ValueError("repetition_penalty needs prompt_token_ids")
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        bias = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
        eos = eos_token_ids or [None] * n
        masked = [(i, t) for i, p in enumerate(params) if output_index[i] < p.min_tokens
                  for t in [*p.stop_token_ids,
                            *([] if p.ignore_eos or eos[i] is None else [eos[i]])]]
        if grammar is not None:
            masked += grammar.banned
        use_grammar = grammar is not None and bool(grammar.rows)
        temperature = [1.0 if p.is_greedy else p.temperature for p in params]
        return cls(
            temperature=tensor(temperature, torch.float32),
            is_greedy=tensor(greedy, torch.bool),
            all_greedy=all(greedy),
            top_k=tensor([p.top_k if p.top_k > 0 else big_k for p in params], torch.int64)
            if use_k else None,
            top_p=tensor([p.top_p for p in params], torch.float32) if use_p else None,
            min_p=tensor([p.min_p for p in params], torch.float32) if use_min_p else None,
            seeds=[p.seed for p in params],
            output_index=list(output_index),
            presence_penalty=tensor([p.presence_penalty for p in params], torch.float32)
            if use_pen else None,
            frequency_penalty=tensor([p.frequency_penalty for p in params], torch.float32)
            if use_pen else None,
            repetition_penalty=tensor([p.repetition_penalty for p in params], torch.float32)
            if use_pen else None,
            output_token_ids=list(output_token_ids) if use_pen and output_token_ids else None,
            prompt_token_ids=list(prompt_token_ids) if use_pen and prompt_token_ids else None,
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
            bias=(tensor([r for r, _, _ in bias], torch.int64),
                  tensor([t for _, t, _ in bias], torch.int64),
                  tensor([b for _, _, b in bias], torch.float32)) if bias else None,
            min_tokens_mask=(tensor([r for r, _ in masked], torch.int64),
                             tensor([t for _, t in masked], torch.int64)) if masked else None,
            grammar_rows=tensor(grammar.rows, torch.int64) if use_grammar else None,
            grammar_bitmask=grammar.bitmask.to(device) if use_grammar else None,
        )

    @classmethod
    def from_batch(cls, batch: ScheduledBatch, device: torch.device | str,
                   vocab_size: int | None = None) -> SamplingMetadata:
        """Metadata for the positions ``batch``'s sampling rows sample at, in
        ``batch.sample_indices`` order: one per row, or k + 1 for a row that verifies k drafts
        (speculative decoding). Position j of a row is processed as the token it would sample:
        the drafts before it count as output (penalties), and min_tokens and the seed's output
        index advance by j."""
        params, outputs, prompts, index, eos = [], [], [], [], []
        for i in batch.sample_indices:
            done, n = batch.output_token_ids[i], len(batch.token_ids[i])
            drafts = batch.token_ids[i][n - batch.num_drafts(i):]
            counts = batch.sampling_params[i].has_penalties  # else the outputs are not read
            for j in range(len(drafts) + 1):
                params.append(batch.sampling_params[i])
                outputs.append([*done, *drafts[:j]] if counts and j else done)
                prompts.append(batch.prompt_token_ids[i])
                index.append(batch.num_output_tokens[i] + j)
                eos.append(batch.eos_token_ids[i] if batch.eos_token_ids else None)
        grammar = batch.grammar
        if isinstance(grammar, Future):  # computed while the model ran (by position already)
            grammar = grammar.result()
        meta = cls.build(params, device, output_token_ids=outputs, prompt_token_ids=prompts,
                         output_index=index, vocab_size=vocab_size, eos_token_ids=eos,
                         grammar=grammar)
        meta.step_seed = batch.step_seed
        return meta

@dataclass
class LogprobsTensors:
    """vLLM layout: column 0 is the sampled token, columns 1..N the top-N of the raw
    distribution (rows asking for fewer than N slice their own columns)."""

    token_ids: torch.Tensor  # [num_reqs, N + 1] int64
    logprobs: torch.Tensor  # [num_reqs, N + 1] fp32
    sampled_token_ranks: torch.Tensor  # [num_reqs] int64, 1 = most likely


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [num_reqs] int64
    logprobs: LogprobsTensors | None  # None unless some row asked for logprobs


class Sampler:
    """Stateless: ``sampler(logits, metadata)`` -> SamplerOutput."""

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        return self.forward(logits, metadata)

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()  # [num_reqs, vocab_size]
        raw_logprobs = (torch.log_softmax(logits, dim=-1)
                        if metadata.max_num_logprobs is not None else None)
        logits = self.process(logits, metadata)
        greedy_ids = logits.argmax(dim=-1)
        if metadata.all_greedy:
            sampled = greedy_ids
        else:
            random_ids = self.sample_random(logits, metadata)
            sampled = torch.where(metadata.is_greedy, greedy_ids, random_ids)
        out_logprobs = None
        if raw_logprobs is not None:
            out_logprobs = self.gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled, out_logprobs)

    # ---- pieces (public for tests and for the spec-decode verifier) ------------------------
    def process(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """logit_bias, min_tokens, penalties and grammar masks applied to fp32 logits: the
        distribution every row samples from before temperature."""
        if metadata.bias is not None or metadata.min_tokens_mask is not None:
            logits = self.apply_bias_and_min_tokens(logits, metadata)
        if metadata.presence_penalty is not None:
            logits = self.apply_penalties(logits, metadata)
        if metadata.grammar_rows is not None:
            logits = self.apply_grammar(logits, metadata.grammar_rows, metadata.grammar_bitmask)
        return logits

    @staticmethod
    def apply_bias_and_min_tokens(logits: torch.Tensor, metadata: SamplingMetadata
                                  ) -> torch.Tensor:
        logits = logits.clone()
        if metadata.bias is not None:
            rows, ids, values = metadata.bias
            logits.index_put_((rows, ids), values, accumulate=True)
        if metadata.min_tokens_mask is not None:
            logits[metadata.min_tokens_mask] = float("-inf")
        return logits

    @staticmethod
    def apply_grammar(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor
                      ) -> torch.Tensor:
        """-inf on the tokens each grammar row does not allow; other rows are only copied."""
        vocab = logits.shape[-1]
        if bitmask.is_cpu:  # numpy unpacks bits several times faster than shifts on the CPU
            bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
            allowed = torch.from_numpy(bits[:, :vocab]).view(torch.bool)
        else:
            shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
            allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)
            allowed = allowed[:, :vocab].bool()
        blocked = torch.tensor(float("-inf"), device=logits.device)
        if rows.numel() == logits.shape[0]:  # every row (rows are increasing and distinct)
            return torch.where(allowed, logits, blocked)
        logits = logits.clone()
        logits[rows] = torch.where(allowed, logits[rows], blocked)
        return logits

    @staticmethod
    def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        num_reqs, vocab = logits.shape
        assert metadata.output_token_ids is not None
        counts = _token_counts(metadata.output_token_ids, num_reqs, vocab, logits.device)
        rep = metadata.repetition_penalty
        assert rep is not None and metadata.frequency_penalty is not None
        if bool((rep != 1.0).any()):
            seen = counts > 0
            if metadata.prompt_token_ids is not None:
                seen |= _token_counts(metadata.prompt_token_ids, num_reqs, vocab,
                                      logits.device) > 0
            scale = torch.where(seen, rep[:, None], torch.ones_like(logits))
            logits = torch.where(logits > 0, logits / scale, logits * scale)
        logits = logits - metadata.frequency_penalty[:, None] * counts
        assert metadata.presence_penalty is not None
        return logits - metadata.presence_penalty[:, None] * (counts > 0).float()

    @staticmethod
    def apply_top_k_top_p_min_p(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Mask (to -inf) what min-p, top-k and top-p remove, on temperature-scaled logits."""
        if metadata.min_p is not None:
            probs = torch.softmax(logits, dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * metadata.min_p[:, None]
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if metadata.top_k is None and metadata.top_p is None:
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        if metadata.top_k is not None:
            ranks = torch.arange(logits.shape[-1], device=logits.device)
            sorted_logits = sorted_logits.masked_fill(
                ranks[None, :] >= metadata.top_k[:, None], float("-inf"))
        if metadata.top_p is not None:
            probs = torch.softmax(sorted_logits, dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # exclusive prefix sum
            drop = (mass_before >= metadata.top_p[:, None]) & (metadata.top_p[:, None] < 1.0)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)

    def probabilities(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """The distribution a non-greedy row samples from: temperature, then min-p, top-k and
        top-p over processed logits."""
        logits = logits / metadata.temperature[:, None]
        logits = self.apply_top_k_top_p_min_p(logits, metadata)
        return torch.softmax(logits, dim=-1)

    def sample_random(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        probs = self.probabilities(logits, metadata)
        noise = self.exponential_noise(probs, metadata)
        return probs.div(noise).argmax(dim=-1)  # Gumbel-max in its exponential form

    @staticmethod
    def exponential_noise(probs: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Exp(1) noise like probs; a seeded row's is keyed on (seed, output index)."""
        noise = torch.empty_like(probs)
        seeded = [i for i, seed in enumerate(metadata.seeds) if seed is not None]
        if len(seeded) < len(metadata.seeds):
            noise.exponential_(generator=_step_generator(metadata, probs.device))
        for i in seeded:
            gen = torch.Generator(device=probs.device)
            gen.manual_seed(_mix_seed(metadata.seeds[i], metadata.output_index[i]))
            noise[i].exponential_(generator=gen)
        return noise.clamp_(min=1e-20)

    @staticmethod
    def gather_logprobs(raw_logprobs: torch.Tensor, sampled: torch.Tensor,
                        num_logprobs: int) -> LogprobsTensors:
        sampled = sampled.long()[:, None]
        sampled_logprob = raw_logprobs.gather(-1, sampled)
        ranks = (raw_logprobs > sampled_logprob).sum(dim=-1) + 1
        if num_logprobs > 0:
            top_logprobs, top_ids = raw_logprobs.topk(num_logprobs, dim=-1)
            token_ids = torch.cat([sampled, top_ids], dim=-1)
            logprobs = torch.cat([sampled_logprob, top_logprobs], dim=-1)
        else:
            token_ids, logprobs = sampled, sampled_logprob
        return LogprobsTensors(token_ids, logprobs, ranks)


def _step_generator(metadata: SamplingMetadata, device: torch.device
                    ) -> torch.Generator | None:
    """The generator of the unseeded rows: keyed on the step's seed when it has one."""
    if metadata.step_seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(_mix_seed(metadata.step_seed, 0))
    return gen


def _token_counts(token_ids: Sequence[Sequence[int]], num_reqs: int, vocab: int,
                  device: torch.device) -> torch.Tensor:
    """[num_reqs, vocab] fp32 occurrence counts (padding goes to an extra dropped column)."""
    max_len = max((len(ids) for ids in token_ids), default=0)
    counts = torch.zeros(num_reqs, vocab + 1, dtype=torch.float32, device=device)
    if max_len:
        padded = torch.full((num_reqs, max_len), vocab, dtype=torch.int64)
        for i, ids in enumerate(token_ids):
            if len(ids):
                padded[i, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.int64)
        padded = padded.to(device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab]
