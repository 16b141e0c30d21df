"""The raw UTF-8 bytes of one token, as the OpenAI API's logprob `bytes` field carries them.

A byte-level tokenizer splits a Devanagari letter (3 bytes) or an emoji (4) across tokens;
decoding such a token alone gives U+FFFD, whose bytes are not the token's. The token's own
bytes come from its vocabulary string instead:

    byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen): each character stands for one byte
    sentencepiece with byte fallback (Llama 2, Gemma): "<0xE0>" is one byte, "▁" a space
    special tokens: the text they decode to (nothing when skipped, as in the answer's text)

so the bytes of a choice's tokens, joined, are the bytes of its text.
"""
from __future__ import annotations

import json
import re

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: character -> the byte it stands for. Printable Latin-1
    bytes stand for themselves; the other 68 are moved up to U+0100 and on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {chr(b): b for b in printable}
    moved = 0
    for b in range(256):
        if b not in printable:
            out[chr(256 + moved)] = b
            moved += 1
    return out


def _decoder_kinds(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    kinds, stack = set(), [json.loads(backend.to_str()).get("decoder") or {}]
    while stack:
        d = stack.pop()
        kinds.add(d.get("type"))
        stack.extend(d.get("decoders") or [])
    return kinds


class TokenBytes:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        kinds = _decoder_kinds(tokenizer)
        self.byte_level = "ByteLevel" in kinds
        self.alphabet = byte_level_alphabet() if self.byte_level else {}
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
        self.added = set(added)
        self._cache: dict[tuple[int, bool], bytes] = {}

    def __call__(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        key = (token_id, skip_special_tokens)
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = self._bytes(token_id, skip_special_tokens)
        return got

    def _bytes(self, token_id: int, skip_special_tokens: bool) -> bytes:
        if token_id in self.special or token_id in self.added:
            if skip_special_tokens and token_id in self.special:
                return b""
            return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self.byte_level and all(c in self.alphabet for c in piece):
            return bytes(self.alphabet[c] for c in piece)
        m = BYTE_TOKEN.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()
