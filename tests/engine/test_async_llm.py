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


def _idle(llm: AsyncLLM) -> tuple[int, int, int]:
    """(running, waiting, used blocks) once every queued command has run."""
    s = llm.run(lambda e: e.stats()).result(timeout=60)
    return s.num_running, s.num_waiting, s.num_used_blocks


def _gate(llm: AsyncLLM, monkeypatch):
    """Make the engine's next step block until the returned event is set; `entered` is set
    once the engine is inside that step."""
    import threading

    runner = llm.engine.runner
    real, entered, release = runner.execute, threading.Event(), threading.Event()

    def execute(batch):
        entered.set()
        release.wait(30)
        return real(batch)

    monkeypatch.setattr(runner, "execute", execute)
    return entered, release


@pytest.mark.parametrize("moment", ["before_admission", "admission_engine_busy", "mid_prefill",
                                    "mid_decode"])
def test_cancellation_at_any_moment_leaves_nothing(async_llm, monkeypatch, moment):
    long_prompt = list(range(1, 120))
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)

    async def consume(prompt, after):
        got = 0
        async for _ in async_llm.generate(prompt, params):
            got += 1
            if got >= after:
                await asyncio.sleep(3600)  # parked until cancelled

    async def main():
        if moment == "before_admission":  # the engine thread has not seen the add yet
            blocked = async_llm.run(lambda e: __import__("time").sleep(0.5))
            task = asyncio.create_task(consume([1, 2, 3], 1))
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.wrap_future(blocked)
        elif moment == "admission_engine_busy":  # the engine is inside another step
            entered, release = _gate(async_llm, monkeypatch)
            other = asyncio.create_task(consume([4, 5, 6], 1))
            await asyncio.to_thread(entered.wait, 30)
            task = asyncio.create_task(consume([1, 2, 3], 1))
            await asyncio.sleep(0.05)
            task.cancel()
            other.cancel()
            release.set()
        elif moment == "mid_prefill":  # budget 48: the 119-token prompt takes 3 steps
            async_llm.engine.scheduler.config = async_llm.engine.config.replace(
                max_num_batched_tokens=48)
            entered, release = _gate(async_llm, monkeypatch)
            task = asyncio.create_task(consume(long_prompt, 1))
            await asyncio.to_thread(entered.wait, 30)
            task.cancel()
            release.set()
        else:
            task = asyncio.create_task(consume([1, 2, 3], 3))
            while not task.done() and _idle(async_llm)[0] == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert _idle(async_llm) == (0, 0, 0)


def test_duplicate_request_id_is_rejected_while_open(async_llm):
    from dsv4.errors import InvalidRequestError

    async def main():
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        first = async_llm.generate([1, 2, 3], params, request_id="same")
        out = await first.__anext__()
        with pytest.raises(InvalidRequestError, match="already in use") as info:
            async for _ in async_llm.generate([4, 5], params, request_id="same"):
                pass
        rest = [o async for o in first]  # the first stream is unharmed
        return out, rest, info.value.param

    out, rest, param = asyncio.run(main())
    assert param == "request_id" and rest[-1].finished
    assert len(out.new_token_ids) + sum(len(o.new_token_ids) for o in rest) == 20
    assert _idle(async_llm) == (0, 0, 0)


def test_shutdown_fails_open_streams_with_a_clear_error(tiny_checkpoint):
    from dsv4.async_llm import EngineDeadError

    llm = AsyncLLM(EngineArgs(model=tiny_checkpoint(tiny_config()), device="cpu",
                              kv_cache_memory=32 << 20, max_model_len=256,
                              block_size=16).create_engine())

    async def main():
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        stream = llm.generate([1, 2, 3], params)
        await stream.__anext__()
        await asyncio.to_thread(llm.shutdown)
        with pytest.raises(EngineDeadError, match="shutting down"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            async for _ in llm.generate([1], params):
                pass

    asyncio.run(asyncio.wait_for(main(), 60))
