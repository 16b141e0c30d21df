"""Gemma 3 beyond the tiny random models of test_equivalence.py: the real Gemma 3 270M weights
(the `gemma3-270m` GGUF that `make install` installs) token-exact against transformers reading
the same file, a prompt longer than its 512-token sliding window, served over HTTP with the
`openai` client; and the language model of a `Gemma3ForConditionalGeneration` checkpoint."""
from __future__ import annotations

import pytest
import torch

from conftest import SLIDING_WINDOW, make_engine, run_to_completion, tiny_config
from vidya import LLM, SamplingParams
from serverutil import LiveServer

NEW = 16


def long_prompt() -> str:
    """About 700 tokens of numbered facts: past the 512-token window, so the window cuts."""
    facts = ["water boils at 100 degrees", "the moon orbits the earth", "plants make sugar from light",
             "iron rusts in damp air", "sound travels through air", "ice floats on water"]
    return " ".join(f"Fact {i}: {facts[i % len(facts)]}." for i in range(80)) + " Fact 80:"


@pytest.fixture(scope="module")
def reference():
    """transformers' Gemma3ForCausalLM over the GGUF, read and dequantized by transformers.
    transformers parses the file's header with gguf's GGUFReader twice (config, then tensors):
    ~25 s each here for a 262k-token vocabulary, so the one reader is kept for both."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from vidya.models import loader
    src = loader.resolve("gemma3-270m")
    readers = {}
    def reader_once(path):
        if path not in readers:
            readers[path] = gguf_reader(path)
        return readers[path]
    gguf_reader = gguf.GGUFReader
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader_once)
        config = AutoConfig.from_pretrained(src.directory, gguf_file=src.gguf_file)
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(src.path, return_tensors=True, model_to_load=shell)["tensors"]
    assert len(readers) == 1, "transformers read the file through another reader: the memo did nothing"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    return model


def hf_greedy(model, ids: list[int], n: int = NEW) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def test_gemma3_270m_is_token_exact_against_transformers(reference):
    llm = LLM("gemma3-270m", dtype="float32", show_progress=False, max_model_len=1024,
              max_num_batched_tokens=256, kv_cache_memory=1)  # the long prompt runs in chunks across the window
    tok = llm.engine.tokenizer
    prompts = [tok(t).input_ids for t in ("The capital of France is", "प्रकाश संश्लेषण", long_prompt())]
    assert len(prompts[2]) > 512 + 100, len(prompts[2])
    want = [hf_greedy(reference, p) for p in prompts]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, min_tokens=NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert "france" in tok.decode(want[0]).lower()  # the weights are the real model's: it stays on topic


def test_gemma3_270m_kept_quantized_is_token_exact_against_transformers(reference):
    """Issue 32, item 8: its Q4_K, Q6_K, Q5_0 and Q8_0 projections kept as stored (a GPU's default,
    --quantization gguf here) give the tokens transformers gives from the same file dequantized."""
    llm = LLM("gemma3-270m", quantization="gguf", dtype="float32", backend="torch", show_progress=False, max_model_len=256,
              kv_cache_memory=0.5)
    assert llm.engine.quant.describe() == "gguf Q4_K+Q5_0+Q6_K+Q8_0 W4/8A16"
    tok = llm.engine.tokenizer
    prompts = [tok(t).input_ids for t in ("The capital of France is", "प्रकाश संश्लेषण")]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, min_tokens=NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(reference, p) for p in prompts]


def test_gemma3_270m_tokenizer_spends_few_tokens_on_hindi():
    from vidya.models import loader
    tok = loader.load_tokenizer(loader.resolve("gemma3-270m"))
    text = "प्रकाश संश्लेषण क्या है? पौधे सूर्य के प्रकाश से भोजन बनाते हैं।"
    per_char = len(tok(text, add_special_tokens=False).input_ids) / len(text)
    assert per_char < 0.5, per_char


def test_gemma3_270m_serves_chat_over_the_openai_api():
    from openai import OpenAI
    s = LiveServer("--model", "gemma3-270m", "--max-model-len", "1024", "--dtype", "float32", "--no-tutor-warmup",
                   "--kv-cache-memory", "1")
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["gemma3-270m"]
        r = client.chat.completions.create(model="gemma3-270m", temperature=0, max_tokens=40,
                                           messages=[{"role": "system", "content": "Answer briefly."},
                                                     {"role": "user", "content": "What is the capital of France?"}])
        choice = r.choices[0]
        assert choice.message.content.strip() and choice.finish_reason in ("stop", "length")
        # Gemma's turn format: the system text opens the user turn, the answer follows "model"
        assert r.usage.prompt_tokens > 10
        t = client.completions.create(model="gemma3-270m", prompt="The capital of France is", max_tokens=16,
                                      temperature=0)
        assert "france" in t.choices[0].text.lower() and t.usage.completion_tokens == 16
        import httpx
        kv = httpx.get(s.url + "/version").json()["kv_cache"]  # the hybrid layout, as the start-up line says it
        assert kv["groups"] == [None] + [512] * 5 and kv["layers_per_block"] == 3 and kv["dtype"] == "float32"
        assert kv["layout"].startswith("hybrid") and f"KV cache {kv['layout']}" in s.log()
        assert kv["token_room"] == kv["sequences_at_max_model_len"] * 1024
    finally:
        s.terminate()


def test_the_hybrid_cache_holds_3_6x_the_sequences_of_a_uniform_one_in_the_same_memory():
    """Issue 33: Gemma 3 270M at 4k context, 1 GiB of KV cache on CPU (the --kv-cache-memory
    default's path): its sliding layers keeping only their 512-token window's blocks hold ~3.6x the
    sequences every layer keeping every token does (421 blocks of 3 layers a sequence against 256 of
    18: 1,263 layer-blocks against 4,608)."""
    counts = {}
    for hybrid in (True, False):
        llm = LLM("gemma3-270m", load_format="dummy", max_model_len=4096, kv_cache_memory=1, show_progress=False,
                  hybrid_kv_cache=hybrid)
        counts[hybrid] = llm.engine.kv_sequences_at_max_len()
        assert llm.engine.kv.is_hybrid == hybrid
    assert counts[True] >= 3.5 * counts[False] and counts[False] >= 3, counts


def test_the_language_model_of_a_multimodal_gemma3_checkpoint(tmp_path, smollm2_tokenizer):
    """Gemma3ForConditionalGeneration: vidya serves its text part; the vision tower is skipped."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig
    torch.manual_seed(5)
    text = tiny_config("gemma3", len(smollm2_tokenizer)).to_dict()
    for k in ("architectures", "model_type", "transformers_version"):
        text.pop(k, None)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          architectures=["Gemma3ForConditionalGeneration"], image_token_index=len(smollm2_tokenizer) - 1)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "vision" not in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    prompt = list(range(5, 5 + 3 * SLIDING_WINDOW))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=10, min_new_tokens=10)
    want = out[0, len(prompt):].tolist()
    engine = make_engine(str(tmp_path))
    rid = engine.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=10, min_tokens=10))
    assert run_to_completion(engine)[rid].outputs[0].token_ids == want
