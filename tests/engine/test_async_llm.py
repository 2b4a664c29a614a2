"""AsyncLLM: concurrent streams, rejection before streaming, cancellation frees the cache."""

from __future__ import annotations

import asyncio

import pytest
from conftest import tiny_config

from dsv4.async_llm import AsyncLLM
from dsv4.engine_args import EngineArgs
from dsv4.sampling_params import SamplingParams


@pytest.fixture
def async_llm(tiny_checkpoint):
    engine = EngineArgs(model=tiny_checkpoint(tiny_config()), device="cpu",
                        kv_cache_memory=32 << 20, max_model_len=256,
                        block_size=16).create_engine()
    llm = AsyncLLM(engine)
    yield llm
    llm.shutdown()


def test_concurrent_streams_and_cancellation(async_llm):
    async def collect(prompt, n_tokens):
        params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
        tokens = []
        async for out in async_llm.generate(prompt, params):
            tokens += out.new_token_ids
        return tokens

    async def cancelled():
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        async for _ in async_llm.generate([5, 6, 7], params, request_id="gone"):
            break  # the client goes away after the first delta

    async def main():
        results = await asyncio.gather(collect([1, 2, 3], 7), collect(list(range(40)), 5),
                                       cancelled())
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in async_llm.generate([], SamplingParams()):
                pass
        await asyncio.sleep(0.2)
        free = await asyncio.wrap_future(
            async_llm.run(lambda eng: (eng.has_unfinished_requests(),
                                       eng.block_manager.all_free())))
        return results, free

    (a, b, _), free = asyncio.run(main())
    assert len(a) == 7 and len(b) == 5
    assert free == (False, True)


def test_failed_step_fails_its_requests_and_engine_keeps_serving(async_llm, monkeypatch):
    runner = async_llm.engine.runner
    real, calls = runner.execute, {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected kernel failure")
        return real(batch)

    monkeypatch.setattr(runner, "execute", flaky)

    async def run(prompt):
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        return [t async for out in async_llm.generate(prompt, params) for t in out.new_token_ids]

    async def main():
        with pytest.raises(RuntimeError, match="injected kernel failure"):
            await run([1, 2, 3])
        tokens = await run([4, 5, 6])
        free = await asyncio.wrap_future(async_llm.run(lambda e: e.block_manager.all_free()))
        return tokens, free

    tokens, free = asyncio.run(main())
    assert len(tokens) == 4 and free
