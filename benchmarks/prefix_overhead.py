"""What prefix caching costs a request that finds nothing cached (hashing, registration, the
kept CSA rows): an 8,192-token prompt and 32 greedy tokens on the demo architecture, caching off
and on, alternating, two runs each (distinct prompts, so nothing hits).

    python benchmarks/prefix_overhead.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from dsv4 import LLM, SamplingParams
from dsv4.demo import DEMO_CONFIG
from dsv4.model import write_checkpoint


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "ck", DEMO_CONFIG, tokenizer=False)
        for caching in (False, True, False, True):
            llm = LLM(str(path), device="cpu", max_model_len=9000, max_num_seqs=4,
                      kv_cache_memory="1GiB", enable_prefix_caching=caching)
            ids = [(7 * i + (13 if caching else 0)) % 120000 + 100 for i in range(8192)]
            t = time.perf_counter()
            llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
            print("caching", caching, f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
