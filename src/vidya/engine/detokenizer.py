"""Incremental detokenization and stop strings.

A byte-level tokenizer splits a Devanagari character (3 UTF-8 bytes) across tokens, so decoding
one token at a time would emit U+FFFD. We decode a small window of recent tokens twice (without
and with the new ones) and emit only the growth, and hold it back while it ends in an incomplete
character. The sent position never moves backwards.

    tokens: | ... | prefix_offset ...... read_offset ...... end |
                    \\-- already emitted --/ \\-- new text --/
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6  # prompt tokens that seed the window (spacing of sentencepiece tokenizers)


def decoder_of(tokenizer) -> Callable[[list[int], bool], str]:
    """`decode(ids, skip_special_tokens)`: the Rust tokenizer's own where transformers' decode
    would only wrap it (a fast tokenizer whose decode is not overridden, with no clean-up of
    spaces), else transformers'. Called twice a token per sequence: a 256-sequence decode step's
    host time 8.3-8.8 -> 6.6-7.3 ms with it (bench/host_step.py, EPYC AVX2)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        TokenizersBackend = None
    cls = type(tokenizer)
    if (TokenizersBackend is not None and isinstance(tokenizer, TokenizersBackend)
            and cls.decode is TokenizersBackend.decode and cls._decode is TokenizersBackend._decode
            and not getattr(tokenizer, "clean_up_tokenization_spaces", False)):
        return tokenizer.backend_tokenizer.decode
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


@dataclass(slots=True)
class IncrementalDetokenizer:
    decode: Callable[[list[int], bool], str]  # decoder_of(the tokenizer)
    skip_special_tokens: bool = True
    tokens: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""

    @classmethod
    def for_prompt(cls, decode, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        ctx = list(prompt_token_ids[-CONTEXT_TOKENS:])
        return cls(decode, skip_special_tokens, ctx, 0, len(ctx))

    def _decode(self, ids: list[int]) -> str:
        return self.decode(ids, self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """Add new tokens; return the text they complete (possibly "")."""
        self.tokens.extend(token_ids)
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end: whatever is still held. Bytes that never completed a character (the answer
        was cut at max_tokens in the middle of a Devanagari letter) are dropped, not shown as
        U+FFFD; an invalid sequence inside the text is still shown as what it is."""
        if self.read_offset == len(self.tokens):
            return ""
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset:])
        delta = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else new_text
        delta = delta.rstrip(REPLACEMENT)
        self.read_offset = len(self.tokens)
        self.text += delta
        return delta


def find_stop(text: str, num_new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends within the last `num_new_chars` characters:
    (index where it starts, the string). Only new text can complete a match."""
    best = None
    for s in stops:
        start = max(0, len(text) - num_new_chars - len(s) + 1)
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string (not safe to stream)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n
