"""`vidya bench sweep` against a live server and `vidya plan` through the CLI: the arithmetic on a
hand-made sweep, impossible targets, bad input, the chart."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest

from serverutil import LiveServer


def level(c: int, rps: float, ttft_p99_s: float, e2e_p99_s: float, failed: int = 0) -> dict:
    return {"concurrency": c, "requests_s": rps, "output_tok_s": rps * 128, "completed": 2 * c, "failed": failed,
            "ttft_p50_ms": 500 * ttft_p99_s, "ttft_p90_ms": 800 * ttft_p99_s, "ttft_p99_ms": 1000 * ttft_p99_s,
            "e2e_p99_ms": 1000 * e2e_p99_s, "itl_p99_ms": 50.0,
            "prompt_tokens_per_request": 700.0, "output_tokens_per_request": 128.0}


@pytest.fixture
def sweep_file(tmp_path):
    sweep = {"version": 1, "model": "smollm2", "base_url": "http://x/v1", "workload": "tutor-64",
             "levels": [level(8, 4.0, 0.5, 9.0), level(16, 6.0, 1.2, 14.0), level(32, 7.0, 2.5, 25.0),
                        level(64, 9.0, 1.0, 30.0, failed=3),  # fast but failing: never the operating point
                        level(128, 12.0, 1.0, 9.0)]}  # meets every target, but past levels that do not
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    return str(path)


def vidya(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidya.cli", *args], capture_output=True, text=True, timeout=300)


def test_plan_arithmetic_on_a_hand_made_sweep(sweep_file):
    r = vidya("plan", "--sweep", sweep_file, "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    # defaults: 50,000 students x 5 questions, 0.2 of them in the peak hour, p99 TTFT 1.4 s
    assert p["feasible"] and p["operating_concurrency"] == 16 and p["hpa_target_running_per_pod"] == 16
    assert p["peak_requests_per_s"] == pytest.approx(50_000 * 5 * 0.2 / 3600)  # 13.9
    assert p["replicas"] == 3  # ceil(13.9 / 6)
    assert p["students_per_day_per_replica"] == pytest.approx(6 * 3600 / (0.2 * 5))  # 21,600
    assert p["cost_per_month"] == 120_000 and p["cost_per_student_per_month"] == pytest.approx(2.4)
    assert p["tokens_per_month"] == pytest.approx(50_000 * 5 * 30 * 828)
    assert p["api_cost_per_month"] == pytest.approx(50_000 * 5 * 30 * 828 / 1e6 * 50)
    # an end-to-end target moves the point down; other inputs change the arithmetic
    r = vidya("plan", "--sweep", sweep_file, "--json", "--p99-e2e", "10", "--students-per-day", "1000",
              "--questions-per-student", "3", "--peak-hour-share", "0.5", "--replica-cost-per-month", "10000",
              "--api-price-per-million-tokens", "20")
    p = json.loads(r.stdout)
    assert p["operating_concurrency"] == 8 and p["replicas"] == 1
    assert p["cost_per_student_per_month"] == pytest.approx(10.0)
    assert p["api_cost_per_month"] == pytest.approx(1000 * 3 * 30 * 828 / 1e6 * 20)
    text = vidya("plan", "--sweep", sweep_file).stdout
    for needle in ("concurrency 16", "replicas at peak", "3", "₹120,000", "vidya:num_requests_running = 16",
                   "hosted API"):
        assert needle in text, text


def test_impossible_targets_say_so_and_name_the_closest_level(sweep_file):
    r = vidya("plan", "--sweep", sweep_file, "--p99-ttft", "0.2")
    assert r.returncode == 3
    assert "NO level meets p99 TTFT <= 0.2 s" in r.stdout and "closest is concurrency 8" in r.stdout


def test_a_reader_that_leaves_early_gets_no_traceback(sweep_file):
    """`vidya plan --sweep s.json --json | head -c 300`: the pipe closes before vidya writes."""
    p = subprocess.Popen([sys.executable, "-m", "vidya.cli", "plan", "--sweep", sweep_file, "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # (before the interpreter has even imported vidya)
    err = p.stderr.read().decode()
    assert p.wait(60) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_bad_plan_input_is_a_clear_message(tmp_path, sweep_file):
    r = vidya("plan", "--sweep", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "cannot read sweep" in r.stderr and "vidya bench sweep" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "other.json").write_text('{"model": "tiny"}')  # JSON, but not a sweep
    r = vidya("plan", "--sweep", str(tmp_path / "other.json"))
    assert r.returncode == 2 and "has no field 'levels'" in r.stderr and "KeyError" not in r.stderr, r.stderr
    r = vidya("plan", "--sweep", sweep_file, "--peak-hour-share", "1.5")
    assert r.returncode == 2 and "--peak-hour-share must be in (0, 1]" in r.stderr
    for flag, value in (("--p99-ttft", "nan"), ("--replica-cost-per-month", "inf"), ("--api-price-per-million-tokens", "-1")):
        r = vidya("plan", "--sweep", sweep_file, flag, value)
        assert r.returncode == 2 and f"{flag} must be a positive number" in r.stderr, (flag, r.stderr)
    # a chart that cannot be written is refused before the plan is computed or printed
    for path, why in ((tmp_path / "no" / "such" / "p.png", "does not exist"), (tmp_path / "p.txt", "name a .png")):
        r = vidya("plan", "--sweep", sweep_file, "--plot", str(path))
        assert r.returncode == 2 and why in r.stderr and not r.stdout and "Traceback" not in r.stderr, r.stderr
    # a sweep whose every request failed says so and why, instead of planning from nothing
    data = json.loads(open(sweep_file).read())
    for lv in data["levels"]:
        lv.update(completed=0, failed=16, requests_s=0.0, ttft_p99_ms=None, errors=["HTTP 404: model 'nope' not found"])
    dead = tmp_path / "dead.json"
    dead.write_text(json.dumps(data))
    r = vidya("plan", "--sweep", str(dead))
    assert r.returncode == 2 and "every request" in r.stderr and "model 'nope' not found" in r.stderr, r.stderr
    data["levels"][0]["concurrency"] = "x"
    dead.write_text(json.dumps(data))
    r = vidya("plan", "--sweep", str(dead))
    assert r.returncode == 2 and "'concurrency' is 'x'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_chart_is_drawn(tmp_path, sweep_file):
    png = tmp_path / "plan.png"
    r = vidya("plan", "--sweep", sweep_file, "--plot", str(png))
    assert r.returncode == 0 and f"chart written to {png}" in r.stderr, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_sweep_a_live_server_then_plan_from_it(tiny_models, tmp_path):
    model_dir, _ = tiny_models["llama"]
    s = LiveServer("--model", model_dir, "--served-model-name", "tiny", "--dtype", "float32",
                   "--max-model-len", "512", "--no-tutor-warmup")
    try:
        out = tmp_path / "sweep.json"
        r = vidya("bench", "sweep", "--base-url", s.url, "--levels", "1,4", "--requests-per-level", "6",
                  "--json", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "concurrency    4" in r.stdout and "sweep" in r.stderr  # a line per level; the bar on stderr
        assert "server backend: cpu " in r.stdout and " math, " in r.stdout, r.stdout  # what ran, as bench serve says
        sweep = json.loads(out.read_text())
        assert sweep["backend"]["device"] == "cpu" and sweep["backend"]["isa"] in r.stdout
        assert sweep["model"] == "tiny" and [lv["concurrency"] for lv in sweep["levels"]] == [1, 4]
        assert sweep["length_spread"] == 0.5 and [lv["latency_requests"] for lv in sweep["levels"]] == [5, 2]
        for lv in sweep["levels"]:
            assert lv["completed"] == 6 and lv["failed"] == 0 and lv["output_tok_s"] > 0
            assert lv["ttft_p99_ms"] > 0 and lv["e2e_p99_ms"] >= lv["ttft_p99_ms"]
            # answers of 64..192 tokens (the workload's 128 +- half), 128 on average
            assert lv["prompt_tokens_per_request"] > 100 and abs(lv["output_tokens_per_request"] - 128) < 1
            assert lv["output_tokens_range"] == [64, 192]
            assert 0 < lv["kv_cache_usage_peak"] <= 1 and lv["preemptions"] == 0
        # each request is a new question: level 4 replays level 1's conversations, yet the prefix
        # cache may hit only what they share before the tag (under one 16-token block of template
        # and a 12-token system prompt), never a whole earlier conversation
        metrics = httpx.get(s.url + "/metrics", timeout=10).text
        hits = float(re.search(r"^vidya:prefix_cache_hits_total\S* (\S+)$", metrics, re.M).group(1))
        assert hits <= 16 * 12, hits
        r = vidya("plan", "--sweep", str(out), "--p99-ttft", "60", "--json")
        p = json.loads(r.stdout)
        assert r.returncode == 0 and p["operating_concurrency"] in (1, 4) and p["replicas"] >= 1
        # --length-spread 0: every answer the workload's length; a level of no more requests than its
        # concurrency has no opening wave to leave out of its latency
        r = vidya("bench", "sweep", "--base-url", s.url, "--levels", "2", "--requests-per-level", "2",
                  "--length-spread", "0", "--json", str(tmp_path / "equal.json"))
        assert r.returncode == 0, r.stdout + r.stderr
        (lv,) = json.loads((tmp_path / "equal.json").read_text())["levels"]
        assert lv["output_tokens_range"] == [128, 128] and lv["latency_requests"] == 2
        # every request failing (a wrong model) reads as that, with the server's reason, not as a slow server
        r = vidya("bench", "sweep", "--base-url", s.url, "--model", "nope", "--levels", "1",
                  "--requests-per-level", "2", "--json", str(tmp_path / "dead.json"))
        assert r.returncode == 1 and "every request failed" in r.stderr and "nope" in r.stderr, r.stderr
        assert "next: vidya plan" not in r.stdout and "failed 2 (" in r.stdout, r.stdout
    finally:
        s.terminate()
    r = vidya("bench", "sweep", "--base-url", s.url, "--levels", "4,1")
    assert r.returncode == 2 and "rising" in r.stderr
    r = vidya("bench", "sweep", "--base-url", s.url, "--length-spread", "1.5")
    assert r.returncode == 2 and "--length-spread must be in [0, 1)" in r.stderr, r.stderr
    # a --json path that cannot be written is refused before the sweep runs (the server is gone)
    r = vidya("bench", "sweep", "--base-url", s.url, "--levels", "1", "--json", str(tmp_path / "no" / "s.json"))
    assert r.returncode == 2 and "cannot write there" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_spread_lengths_keep_the_mean_and_mix_the_order():
    from vidya.bench.sweep import spread_lengths
    xs = spread_lengths(128, 64, 0.5, seed=8)
    assert min(xs) == 64 and max(xs) == 192 and abs(sum(xs) / len(xs) - 128) < 0.5
    assert xs == spread_lengths(128, 64, 0.5, seed=8) and xs != sorted(xs)  # fixed by the seed, not in order
    assert spread_lengths(128, 5, 0.0, seed=1) == [128] * 5 and spread_lengths(7, 1, 0.5, seed=1) == [7]
    assert min(spread_lengths(1, 9, 0.9, seed=1)) == 1  # never below one token
