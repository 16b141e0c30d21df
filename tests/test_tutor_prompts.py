"""The tutor's prompt data file: every subject and class renders, in the right language."""
from __future__ import annotations

import pytest

from vidya.tutor import prompts


@pytest.mark.parametrize("subject", list(prompts.subjects()))
@pytest.mark.parametrize("klass", prompts.classes())
def test_every_subject_and_class_renders(subject, klass):
    text = prompts.system_prompt(subject, klass)
    data = prompts.load()
    assert text.startswith(data["base"])
    assert data["subjects"][subject]["prompt"] in text and data["classes"][klass] in text
    assert f"कक्षा {klass}" in text
    assert "{" not in text  # no unfilled template


def test_the_voice_is_in_the_data_file():
    data = prompts.load()
    assert data["version"] == 1
    assert set(prompts.classes()) == {str(c) for c in range(6, 13)}
    assert {n["hi"] for n in prompts.subjects().values()} == {"विज्ञान", "गणित", "हिंदी", "सामाजिक विज्ञान", "English"}
    base = data["base"]
    for rule in ("उसी में उत्तर", "Hinglish", "उदाहरण", "नहीं जानते"):  # language, examples, honesty
        assert rule in base
    assert len(data["examples"]["hi"]) >= 3 and len(data["examples"]["en"]) >= 3


def test_unknown_choices_say_what_exists():
    with pytest.raises(ValueError, match="one of science"):
        prompts.system_prompt("astrology", "8")
    with pytest.raises(ValueError, match="one of 6"):
        prompts.system_prompt("maths", "13")


def test_vidya_chat_streams_from_a_running_server(server):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "vidya.cli", "chat", "--base-url", server.url, "--max-tokens", "12",
                        "--temperature", "0", "--subject", "maths", "--class", "7"],
                       input="What is 2 + 2?\n\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "smollm2" in r.stdout and "शिक्षक> " in r.stdout
    answer = r.stdout.split("शिक्षक> ", 1)[1].strip()
    assert answer  # streamed text arrived


def test_vidya_chat_says_when_the_server_is_not_there():
    import subprocess
    import sys

    from serverutil import free_port
    r = subprocess.run([sys.executable, "-m", "vidya.cli", "chat", "--base-url", f"http://127.0.0.1:{free_port()}"],
                       input="", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is the server running" in r.stderr and "Traceback" not in r.stderr


def test_vidya_chat_offline_answers_then_quits_on_an_empty_line(tiny_models):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "vidya.cli", "chat", "--model", tiny_models["llama"][0],
                        "--max-tokens", "4", "--dtype", "float32", "--system", "You are a tutor."],
                       input="hello\n\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("शिक्षक> ") == 1 and r.stdout.count("छात्र> ") == 2
    assert "(cut at the length limit)" in r.stdout  # 4 tokens of a random model: cut, and it says so


def test_vidya_chat_offline_speaks_as_the_tutor_for_the_subject_and_class():
    """Offline, as from a server: the tutor's system prompt for --subject and --class (the
    default model's answer starts from it: the prompt is in the prefix the engine computed), and
    a subject or class that does not exist is refused before a model is loaded."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "vidya.cli", "chat", "--subject", "astrology"],
                       input="", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown subject 'astrology'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "vidya.cli", "chat", "--class", "99", "--base-url", "http://127.0.0.1:9"],
                       input="", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown class '99'" in r.stderr
    code = ("import sys; from vidya import cli; from vidya.engine import llm_engine\n"
            "seen = []; add = llm_engine.LLMEngine.add_request\n"
            "def spy(self, rid, prompt, params): seen.append(self.tokenizer.decode(prompt)); return add(self, rid, prompt, params)\n"
            "llm_engine.LLMEngine.add_request = spy\n"
            "rc = cli.main(['chat', '--subject', 'maths', '--class', '7', '--max-tokens', '2', '--temperature', '0'])\n"
            "print('PROMPT', repr(seen[0])); sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], input="2 + 2?\n\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import ast
    shown = ast.literal_eval(r.stdout.split("PROMPT ", 1)[1].strip())
    assert prompts.system_prompt("maths", "7") in shown and "2 + 2?" in shown


def test_the_tutor_config_calls_a_small_model_a_demo(server):
    import httpx
    from vidya.tutor.routes import demo_notice
    cfg = httpx.get(server.url + "/tutor/config").json()
    assert cfg["ready"] and cfg["demo"]["size"] == "135M" and 1.2e8 < cfg["demo"]["parameters"] < 1.5e8
    assert "Gemma 3 4B" in cfg["demo"]["recommended"]
    assert demo_notice(8_000_000_000) is None and demo_notice(1_000_000_000)["size"] == "1.0B"
