"""Compiled CPU decode steps (transerve/engine/compiled_step.py) give the eager engine's tokens, and a
model the compiler rejects is served eagerly after one log line.

One bucket (8) keeps the compile to one per test run: every decode batch, a single request included,
is padded up to 8 rows. The compiled code is cached on disk, so later runs skip inductor's C++ compile.
"""

from __future__ import annotations

import logging
import time

import torch

from conftest import LiveServer
from openai_server import sdk_client
from test_engine import EOS, greedy, random_prompts
from transerve.actors.assembly import load
from transerve.config import CacheConfig, EngineConfig, SchedulerConfig
from transerve.engine.compiled_step import CompiledDecode, inductor_cache_dir
from transerve.engine.core import generate
from transerve.engine.request import Request

LENGTHS = [30, 45, 60, 20, 50, 35, 40, 25]


def engine(compiled: bool, num_kv_blocks: int = 24, quantization: str = "auto", spec: str = "tiny/llama"):
    """An engine on `spec`; compiled: with compiled decode steps for one bucket, 8, once `compile_buckets` ran."""
    config = EngineConfig(enforce_eager=not compiled, quantization=quantization,
                          cache=CacheConfig(block_size=16, num_kv_blocks=num_kv_blocks),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64))
    loaded = load(spec, config, allow_download=False)
    runner = loaded.runner
    if compiled:  # the runner's scratch block is its last one
        runner.graphs = CompiledDecode(runner.model, runner.kv_caches, max_num_seqs=8, max_blocks_per_seq=runner.max_blocks_per_seq,
                                       block_size=16, scratch_block=num_kv_blocks, buckets=(8,), max_batch=8)
    return loaded


def run(loaded, prompts, max_tokens=24):
    requests = [Request(str(i), p, greedy(max_tokens), seed=0, eos_token_ids=EOS) for i, p in enumerate(prompts)]
    outputs = generate(loaded.core, loaded.runner, requests)
    return [outputs[str(i)] for i in range(len(prompts))]


def test_compiled_decode_gives_the_eager_tokens_alone_and_in_a_preempting_batch(tiny_repos):
    eager, compiled = engine(compiled=False), engine(compiled=True)
    compiled.runner.graphs.compile_buckets()
    prompts = random_prompts(eager.runner.model.config.vocab_size, LENGTHS, seed=2)
    assert run(compiled, prompts[:1]) == run(eager, prompts[:1])
    # 24 blocks of 16 tokens cannot hold all eight; a 64-token budget chunks the prompts.
    assert run(compiled, prompts, 40) == run(eager, prompts, 40)
    assert compiled.core.scheduler.num_preemptions > 0
    graphs = compiled.runner.graphs
    assert set(graphs.steps) == {8} and graphs.steps_run > 40 and not graphs.failed


def test_a_model_the_compiler_rejects_is_served_eagerly_with_one_log_line(tiny_repos, caplog):
    loaded = engine(compiled=True, num_kv_blocks=64)
    # A test-only layer hook that dynamo cannot trace into a full graph.
    loaded.runner.model.model.layers[0].register_forward_hook(lambda *args: torch._dynamo.graph_break())
    eager = engine(compiled=False, num_kv_blocks=64)
    prompts = random_prompts(eager.runner.model.config.vocab_size, LENGTHS[:3], seed=3)
    with caplog.at_level(logging.INFO, logger="transerve.engine.compiled_step"):
        loaded.runner.graphs.compile_buckets()
        assert run(loaded, prompts) == run(eager, prompts)
    failures = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) == 1 and "running eagerly" in failures[0].getMessage()
    assert loaded.runner.graphs.failed and loaded.runner.graphs.bucket(1) is None



def test_a_server_compiles_decode_steps_in_the_background_and_a_restart_loads_them(tiny_repos, tmp_path):
    """`transerve serve` on CPU answers at once (eagerly while a child process compiles its buckets), then
    from compiled steps, with the same greedy text; a second start loads the saved steps instead."""
    def ask(srv) -> str:
        return sdk_client(srv.base_url).completions.create(model="tiny/llama", prompt="the compiled step", max_tokens=16,
                                                           temperature=0).choices[0].text

    def wait_for(srv, line: str) -> None:
        deadline = time.monotonic() + 600  # a cold compile on a 2-core box
        while line not in srv.output():
            assert "failed" not in srv.output() and time.monotonic() < deadline, srv.output()
            time.sleep(0.5)

    # --max-num-seqs 2: buckets 1 and 2. Saved steps go to a fresh cache (the first start compiles); inductor's
    # own cache stays the shared one, so a warm box compiles in about a minute.
    args = ("tiny/llama", "--num-kv-blocks", "64", "--max-num-seqs", "2")
    env = {"TRANSERVE_CACHE": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache_dir())}
    srv = LiveServer(*args, compile_decode=True, env=env)
    try:
        first = ask(srv)
        wait_for(srv, "decode steps of up to 2 sequences run compiled")
        assert "compiling the decode steps for batch sizes 1, 2 in a background process" in srv.output()
        assert ask(srv) == first and "guards failed" not in srv.output()
    finally:
        assert srv.stop() == 0, srv.output()
    again = LiveServer(*args, compile_decode=True, env=env)
    try:
        wait_for(again, "loaded the compiled decode steps for batch sizes 1, 2")
        assert ask(again) == first and "compiling" not in again.output() and "guards failed" not in again.output()
    finally:
        assert again.stop() == 0, again.output()
