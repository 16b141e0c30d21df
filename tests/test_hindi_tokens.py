"""bench/hindi_tokens.py, the measurement behind the README's tokens-per-Hindi-character table:
the embedded tokenizers on the tutor's text, and its tiktoken-rank BPE on a hand-made rank file."""
from __future__ import annotations

import base64
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "hindi_tokens.py")


def per_char(table: str, name: str) -> float:
    m = re.search(rf"^\| {re.escape(name)} \| \d+ \| ([\d.]+) \|", table, re.M)
    assert m, table
    return float(m.group(1))


def test_gemma_spends_fewer_tokens_on_the_tutors_hindi_than_smollm2(tmp_path):
    ranks = tmp_path / "tiny.tiktoken"  # every byte, then the merges "ab" and "ab" + "c"
    pieces = [bytes([b]) for b in range(256)] + [b"ab", b"abc"]
    ranks.write_text("".join(f"{base64.b64encode(p).decode()} {i}\n" for i, p in enumerate(pieces)))
    r = subprocess.run([sys.executable, SCRIPT, "smollm2", "gemma3-270m", "--tiktoken", f"bytes={ranks}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    gemma, smol, raw = per_char(r.stdout, "gemma3-270m"), per_char(r.stdout, "smollm2"), per_char(r.stdout, "bytes")
    assert 0.1 < gemma < 0.5 < smol < 2, r.stdout
    assert 2 < raw < 3  # bytes: 3 a Devanagari letter, 1 a space or digit; no merge applies
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from hindi_tokens import RankBPE
    bpe = RankBPE(str(ranks))
    assert bpe.count("abc") == 1 and bpe.count("abd") == 2 and bpe.count("xyz") == 3
