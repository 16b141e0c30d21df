"""`vidya bench throughput` runs end to end through the CLI (a smoke test of the benchmark's
plumbing on a tiny model: it measures nothing and asserts no speed)."""
from __future__ import annotations

import json

from vidya.cli import main


def test_bench_throughput_with_hf_baseline_writes_a_report(tiny_models, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["bench", "throughput", "--model", tiny_models["llama"][0], "--num-prompts", "6",
               "--block-size", "4", "--baseline", "hf", "--baseline-requests", "1", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    vidya_row, hf_row = report["rows"]
    assert vidya_row["requests"] == 6 and vidya_row["output_tokens"] == 6 * 128
    assert hf_row["requests"] == 1 and hf_row["output_tokens"] == 128
    assert 0.0 <= vidya_row["kv_waste"] < 1.0
    assert vidya_row["x_vs_hf"] > 0
    # the result names what ran: the platform vidya/platform.py chose, as the start-up line does
    assert report["platform"]["isa"] and report["platform"]["backend"] in ("cpu", "torch")
    printed = capsys.readouterr().out
    assert "out tok/s" in printed and f"backend: cpu {report['platform']['isa']}" in printed


def test_bad_flag_values_are_refused_before_anything_loads(capsys):
    """A port out of range (uvicorn would listen on it modulo 65536), --num-prompts below 1 (-1
    failed after loading the model; 0 silently ran the whole workload), chat's --max-tokens and
    --temperature (refused only after the first question): each a message naming the fix."""
    import pytest
    for argv, words in ((["serve", "--port", "99999"], "a TCP port is 1 to 65535"),
                        (["bench", "throughput", "--num-prompts", "-1"], "must be a whole number >= 1"),
                        (["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "0"], ">= 1")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err
    for argv, words in ((["chat", "--base-url", "http://127.0.0.1:9", "--max-tokens", "-3"], "--max-tokens must be >= 1"),
                        (["chat", "--base-url", "http://127.0.0.1:9", "--temperature", "5"], "between 0 and 2")):
        assert main(argv) == 2 and words in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    from vidya import __version__
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"vidya {__version__}"


def test_cli_reports_user_errors_without_a_traceback(capsys):
    rc = main(["bench", "throughput", "--model", "/no/such/dir"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_bench_serve_against_a_live_server(server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", server.url, "--num-prompts", "6", "--concurrency", "3",
               "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["model"] == "smollm2" and report["completed"] == 6 and report["failed"] == 0
    assert report["output_tokens"] == 6 * 128  # the workload asks for ignore_eos: exactly max_tokens each
    for name in ("ttft", "itl", "e2e"):
        assert 0 < report[f"{name}_p50_ms"] <= report[f"{name}_p90_ms"] <= report[f"{name}_p99_ms"]
    assert report["ttft_p99_ms"] <= report["e2e_p99_ms"]
    assert 0 < report["server_metrics"]["kv_cache_waste_perc"] < 1  # read from vidya's /metrics
    backend = report["server_metrics"]["backend"]  # read from vidya's /version
    assert backend["device"] == "cpu" and backend["isa"]
    printed = capsys.readouterr().out
    assert "output tok/s" in printed and f"server backend: cpu {backend['isa']}" in printed


def test_bench_serve_names_an_unreachable_server(capsys):
    from serverutil import free_port
    rc = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "is the server running" in err and "Traceback" not in err


def test_host_step_bench_runs_and_reports_the_host_time():
    """bench/host_step.py (the README's host-time figure) at toy size: it runs the engine's decode
    steps and reports a positive host time for the batch it was asked for, and the part of it that
    builds outputs."""
    import os
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, "bench", "host_step.py"), "--seqs", "4", "--steps", "3"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.path.join(root, "src")})
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"at 4 sequences: median ([0-9.]+) ms over 3 steps, of which building outputs ([0-9.]+) ms "
                  r"\(overlapped on a GPU: (-?[0-9.]+) ms left", p.stdout)
    assert m, p.stdout
    total, outputs, left = map(float, m.groups())
    assert total > outputs > 0 and abs(total - outputs - left) < 0.011, p.stdout


def test_long_prefill_token_threshold_flag_reaches_the_scheduler(capsys):
    """`--long-prefill-token-threshold` (vLLM's flag): the default caps a prompt's chunk at 512
    tokens (at most the budget), 0 turns the cap off, a negative value is one clear error."""
    import argparse

    from vidya.cli import add_engine_args, engine_args
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    cap = lambda *argv: engine_args(parser.parse_args(list(argv)), False).scheduler_config(1024).long_prefill_token_threshold
    assert cap() == 512 and cap("--long-prefill-token-threshold", "0") == 0
    assert cap("--long-prefill-token-threshold", "64") == 64
    assert cap("--max-num-batched-tokens", "256") == 256  # never above the budget
    assert main(["serve", "--long-prefill-token-threshold", "-1"]) == 2
    assert "long_prefill_token_threshold must be an integer >= 0" in capsys.readouterr().err
