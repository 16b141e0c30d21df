"""bench/kv_capacity.py (issue 33's capacity arithmetic) runs and agrees with the engine's layout:
Gemma 3 4B's hybrid cache holds ~2.8x the 4k sequences of the uniform one in the same room."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_capacity_table_runs_and_the_hybrid_cache_multiplies_gemma_3_4b(tmp_path):
    out = tmp_path / "cap.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kv_capacity.py"), "--json", str(out)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {(r["model"], r["weight_bits"], r["cache"]): r for r in json.loads(out.read_text())}
    uniform, hybrid = rows["Gemma-3-4B", 16, "uniform bf16"], rows["Gemma-3-4B", 16, "hybrid bf16"]
    assert uniform["vs_today"] == 1.0 and 2.6 < hybrid["sequences"] / uniform["sequences"] < 2.9
    # the per-sequence figure is the layout's: 256 full-attention blocks of 5 layers and 6 sliding
    # groups of 65 (a 1,024 window + the block being written), 16 tokens of 4 KiB a layer each
    assert hybrid["per_sequence_mib"] == (256 + 6 * 65) * 5 * 16 * 4 / 1024
    assert rows["Llama-3-8B", 16, "uniform bf16"]["per_sequence_mib"] == 512.0
