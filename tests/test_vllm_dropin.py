"""A vLLM command line and vLLM's request habits on `vidya serve` (issue 31): `vllm serve MODEL`'s
positional model and the flags a vLLM user passes run unchanged (each either works or is
accepted with a one-line note); an unknown flag is one line naming it; the model's
generation_config.json gives the sampling defaults (--generation-config auto, as vLLM) and
`vllm` turns them off; --chat-template replaces the model's; vLLM's request fields are honoured
(include_stop_str_in_output, min_tokens) or refused with a 400 that names the field and why."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import openai
import pytest
from serverutil import LiveServer

TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<<assistant>>{% endif %}")


@pytest.fixture(scope="module")
def greedy_model(tiny_models, tmp_path_factory):
    """The tiny Llama whose generation_config.json says temperature 0 (greedy), as a model's may."""
    d = tmp_path_factory.mktemp("greedy-by-default") / "model"
    shutil.copytree(tiny_models["llama"][0], d)
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.0}))
    return str(d)


@pytest.fixture(scope="module")
def vllm_style(greedy_model, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    s = LiveServer(greedy_model, "--served-model-name", "tiny", "--dtype", "float", "--max-model-len", "256",
                   "--no-tutor-warmup", "--kv-cache-memory", "1", "--enable-prefix-caching", "--trust-remote-code",
                   "--disable-log-requests", "--disable-log-stats", "--swap-space", "4", "--kv-cache-dtype", "auto",
                   "--enable-chunked-prefill", "--chat-template", str(template), "--generation-config", "auto")
    yield s
    s.terminate()


def two_samples(server) -> list[str]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    r = client.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=12, n=2, seed=1)
    return [c.text for c in r.choices]


def test_a_vllm_command_line_serves_with_a_note_per_flag_vidya_does_not_act_on(vllm_style):
    log = vllm_style.log()
    for flag in ("--enable-prefix-caching", "--trust-remote-code", "--disable-log-requests", "--swap-space",
                 "--disable-log-stats", "--enable-chunked-prefill"):
        (line,) = [l for l in log.splitlines() if l.startswith(f"vidya: {flag}: accepted; ")]
    assert httpx.get(vllm_style.url + "/v1/models").json()["data"][0]["id"] == "tiny"


def test_the_models_generation_config_sets_the_defaults_and_vllm_turns_them_off(vllm_style, greedy_model):
    a, b = two_samples(vllm_style)
    assert a == b  # no temperature in the request: the model's 0.0, greedy, for both samples
    s = LiveServer(greedy_model, "--served-model-name", "tiny", "--max-model-len", "256", "--no-tutor-warmup",
                   "--kv-cache-memory", "1", "--generation-config", "vllm")
    try:
        a, b = two_samples(s)
        assert a != b  # OpenAI's temperature 1 on a random model: two samples of 12 tokens differ
    finally:
        s.terminate()


def test_chat_template_flag_replaces_the_models(vllm_style, smollm2_tokenizer):
    r = httpx.post(vllm_style.url + "/tokenize", json={"messages": [{"role": "user", "content": "namaste"}]})
    assert r.json()["tokens"] == smollm2_tokenizer("<<user>> namaste\n<<assistant>>", add_special_tokens=False).input_ids


def test_include_stop_str_in_output_keeps_the_stop_string(vllm_style):
    client = openai.OpenAI(base_url=vllm_style.url + "/v1", api_key="none")
    full = client.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3
    cut = client.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=12, temperature=0, stop=[stop])
    kept = client.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=12, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    at = full.index(stop)
    assert cut.choices[0].text == full[:at] and kept.choices[0].text == full[:at + 3]
    assert kept.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra,param", [
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"structured_outputs": {"json": {"type": "object"}}}, "structured_outputs"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
])
def test_vllm_fields_vidya_does_not_implement_are_400s_that_say_why(vllm_style, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    r = httpx.post(vllm_style.url + "/v1/chat/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and ": " in err["message"], err
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "min_tokens": 2,
          "use_beam_search": False, "guided_json": None}  # (their "off" values pass)
    assert httpx.post(vllm_style.url + "/v1/chat/completions", json=ok).status_code == 200


def vidya(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidya.cli", *args], capture_output=True, text=True, timeout=120)


def test_an_unknown_flag_is_one_line_naming_it_and_refused_values_say_why():
    r = vidya("serve", "--no-such-flag")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--no-such-flag" in r.stderr, r.stderr
    r = vidya("serve", "--quantization", "fp8")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'fp8' is not served" in r.stderr, r.stderr
    r = vidya("serve", "--quantization", "awq")  # (a served method the default model's GGUF does not have)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "has no awq quantization_config" in r.stderr
    r = vidya("serve", "some/model", "--model", "other/model")
    assert r.returncode == 2 and "two models given" in r.stderr, r.stderr
    r = vidya("serve", "--kv-cache-dtype", "int4")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--kv-cache-dtype" in r.stderr, r.stderr


def test_the_offline_llm_takes_the_generation_config_as_its_default_sampling_params(greedy_model):
    from vidya import LLM
    for generation_config, greedy in (("auto", True), ("vllm", False)):
        llm = LLM(greedy_model, dtype="float32", max_model_len=128, kv_cache_memory=0.05, show_progress=False,
                  generation_config=generation_config)
        assert llm.get_default_sampling_params().temperature == (0.0 if greedy else 1.0)
        a, b = (o.outputs[0].text for o in llm.generate(["w5 w6 w7"] * 2, use_tqdm=False))
        assert (a == b) == greedy


def test_add_generation_prompt_false_leaves_the_assistant_turn_unopened(vllm_style, smollm2_tokenizer):
    """vLLM's chat field reaches the chat template (the fixture's opens <<assistant>> only when asked)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "namaste"}], "max_tokens": 1}
    count = lambda text: len(smollm2_tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    on = httpx.post(vllm_style.url + "/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"]
    off = httpx.post(vllm_style.url + "/v1/chat/completions",
                     json={**body, "add_generation_prompt": False}).json()["usage"]["prompt_tokens"]
    assert (on, off) == (count("<<user>> namaste\n<<assistant>>"), count("<<user>> namaste\n"))
