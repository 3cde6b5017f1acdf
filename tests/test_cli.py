"""The `transerve` command as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transerve.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_download_without_the_hub_fails_with_one_clear_line():
    result = run("download", "Qwen/Qwen2.5-0.5B-Instruct")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download Qwen/Qwen2.5-0.5B-Instruct")


def test_serve_with_an_unknown_model_exits_with_a_clear_error():
    result = run("serve", "nobody/no-such-model", "--port", "0")
    assert result.returncode == 2
    assert "nobody/no-such-model" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_override_generation_config_stops_the_start_with_a_clear_error():
    for value, words in (("{temperature: 1}", "not valid JSON"), ('["temperature"]', "must be a JSON object"),
                         ('{"num_beams": 4}', "'num_beams' is not a sampling default"),
                         ('{"temperature": 3}', "temperature must be a number between 0.0 and 2.0")):
        result = run("serve", "--override-generation-config", value, "--port", "0")
        assert result.returncode == 2, value
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_help_lists_every_serve_flag():
    result = run("serve", "--help")
    for flag in ("--host", "--port", "--device", "--dtype", "--force-model", "--max-num-seqs", "--max-model-len",
                 "--block-size", "--num-kv-blocks", "--gpu-memory-utilization", "--override-generation-config", "--log-level"):
        assert flag in result.stdout


def test_batch_limits_left_unset_follow_the_device_and_flags_win():
    from transerve.cli.main import build_parser
    from transerve.cli.serve import config_from_args

    unset = config_from_args(build_parser().parse_args(["serve", "--no-preload"])).engine.scheduler
    assert (unset.for_device("cuda").max_num_seqs, unset.for_device("cuda").max_num_batched_tokens) == (256, 8192)
    assert (unset.for_device("cpu").max_num_seqs, unset.for_device("cpu").max_num_batched_tokens) == (64, 1024)
    given = config_from_args(build_parser().parse_args(["serve", "--max-num-seqs", "8", "--max-num-batched-tokens", "96"]))
    assert given.engine.scheduler.for_device("cuda").max_num_seqs == 8
    assert given.engine.scheduler.for_device("cuda").max_num_batched_tokens == 96
