"""Streaming Devanagari: pieces never hold a broken character and always join to the full
decode, whatever the chunking. Stop strings are found across token boundaries."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from vidya.engine.detokenizer import IncrementalDetokenizer, decoder_of, find_stop, held_back

HINDI = ("प्रकाश संश्लेषण वह प्रक्रिया है जिसमें हरे पौधे सूर्य के प्रकाश, जल और कार्बन डाइऑक्साइड से "
         "भोजन बनाते हैं। कक्षा 10 के छात्र: क्षेत्रफल = लंबाई × चौड़ाई। Hinglish bhi chalega! 😀")


def stream(tokenizer, ids, prompt_ids, chunks):
    d = IncrementalDetokenizer.for_prompt(decoder_of(tokenizer), prompt_ids)
    pieces, i = [], 0
    for n in chunks:
        if i >= len(ids):
            break
        pieces.append(d.add(ids[i:i + n]))
        i += n
    if i < len(ids):
        pieces.append(d.add(ids[i:]))
    pieces.append(d.flush())
    return pieces


@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(st.integers(1, 4), min_size=1, max_size=200), start=st.integers(0, 40))
def test_hindi_over_random_chunkings_equals_full_decode(smollm2_tokenizer, chunks, start):
    tok = smollm2_tokenizer
    ids = tok(HINDI[start:], add_special_tokens=False).input_ids  # any character boundary
    prompt_ids = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    pieces = stream(tok, ids, prompt_ids, chunks)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    for p in pieces[:-1]:
        assert "\ufffd" not in p, f"a broken character was streamed: {p!r}"
        p.encode("utf-8")


def test_devanagari_is_really_split_across_tokens(smollm2_tokenizer):
    ids = smollm2_tokenizer("संश्लेषण", add_special_tokens=False).input_ids
    singles = [smollm2_tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles), "the test needs a token that splits a character"


def test_find_stop_across_boundaries_and_earliest_first():
    text = "answer: 42\nUser: next"
    assert find_stop(text, 6, ["User:"]) == (11, "User:")
    assert find_stop("abcXYZ", 1, ["XYZ", "YZ"]) == (3, "XYZ")
    assert find_stop("abc", 1, ["zz"]) is None


def test_held_back_only_possible_stop_prefixes():
    assert held_back("hello Us", ["User:"]) == 2
    assert held_back("hello", ["User:"]) == 0
    assert held_back("x<|", ["<|end|>", "|>"]) == 2


def test_a_character_cut_by_the_length_limit_is_dropped_not_shown_as_replacement(smollm2_tokenizer):
    tok = smollm2_tokenizer
    word = "प्रकाश संश्लेषण"
    ids = tok(word, add_special_tokens=False).input_ids
    cuts = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert cuts, "the tokenizer should split some Devanagari character across tokens"
    for k in cuts:  # generation stopped (max_tokens) after token k, inside a character
        detok = IncrementalDetokenizer.for_prompt(decoder_of(tok), [])
        text = "".join(detok.add([i]) for i in ids[:k]) + detok.flush()
        assert "\ufffd" not in text and word.startswith(text), (k, text)


def test_the_fast_decoder_says_what_transformers_says():
    """decoder_of calls the Rust tokenizer directly where transformers' decode only wraps it: the
    same text for both embedded tokenizers (byte-level BPE; sentencepiece-style), special tokens
    kept or skipped; transformers' own decode where it would clean up spaces."""
    from vidya.models import loader
    for name in ("smollm2", "gemma3-270m"):
        tok = loader.load_tokenizer(loader.resolve(name))
        fast = decoder_of(tok)
        assert fast == tok.backend_tokenizer.decode  # the direct path is the one taken
        ids = tok.apply_chat_template([{"role": "user", "content": HINDI}], tokenize=True)["input_ids"]
        for skip in (True, False):
            for k in (1, 2, 5, len(ids)):
                assert fast(ids[:k], skip) == tok.decode(ids[:k], skip_special_tokens=skip), (name, k, skip)
        tok.clean_up_tokenization_spaces = True
        assert decoder_of(tok) != tok.backend_tokenizer.decode  # falls back to transformers' decode
        assert decoder_of(tok)(ids[:5], True) == tok.decode(ids[:5], skip_special_tokens=True)
