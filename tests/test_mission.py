"""The mission's own vLLM setup, moved to vidya by changing only the image (and, where the model
cannot be fetched here, serving the embedded model under the mission's model name): its
Kubernetes manifests (tests/mission/) render and validate, its HPA reads vLLM's running-requests
gauge through the prometheus-adapter rule people use for vLLM, on a live `vidya serve` started
with the Deployment's own args; and its `openai` client snippet gets an answer."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import httpx
import kubernetes_validate
import pytest
import yaml
from serverutil import LiveServer
from test_deploy import K8S_VERSION, of_kind, tool

MISSION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mission")
MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def render() -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", MISSION], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def adapter_metrics(rule: dict, exposition: str) -> dict[str, str]:
    """What a prometheus-adapter rule makes of a scrape: {metric the HPA sees: series}. The series
    selector's name part (a name or `__name__=~"re"`) is matched against the exported names; the
    namespace/pod matchers are labels Prometheus adds when it scrapes a pod, so they are not here."""
    query = rule["seriesQuery"]
    m = re.search(r'__name__=~"([^"]+)"', query)
    name_re = m.group(1) if m else re.escape(re.match(r"^([a-zA-Z_:][\w:]*)", query).group(1))
    out = {}
    for series in set(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", exposition, re.M)):
        if re.fullmatch(name_re.strip("^$"), series):
            as_ = re.sub(r"\$\{(\d+)\}", r"\\\1", rule["name"]["as"])
            out[re.sub(rule["name"]["matches"], as_, series)] = series
    return out


@pytest.fixture(scope="module")
def mission_server():
    container = of_kind(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = list(container["args"])
    args[args.index("--model") + 1] = "smollm2"  # (the 8B cannot be fetched here; its name is kept below)
    s = LiveServer(*args, "--served-model-name", MODEL, "--no-tutor-warmup", "--kv-cache-memory", "1")
    yield s, container
    s.terminate()


def test_the_mission_manifests_render_with_only_the_image_changed_and_validate():
    docs = render()
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    container = of_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/vidya/vidya:cuda"
    assert container["args"][:2] == ["--model", MODEL]


def test_the_mission_hpa_reads_vllms_running_gauge_from_a_live_vidya(mission_server):
    s, container = mission_server
    assert httpx.get(s.url + container["readinessProbe"]["httpGet"]["path"]).status_code == 200
    hpa = of_kind(render(), "HorizontalPodAutoscaler")
    wanted = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rule,) = yaml.safe_load(open(os.path.join(MISSION, "adapter-rules.yaml")))["rules"]
    text = httpx.get(s.url + "/metrics").text
    seen = adapter_metrics(rule, text)
    assert wanted in seen, f"the adapter would offer {sorted(seen)}, the HPA reads {wanted}"
    line = re.search(rf'^{re.escape(seen[wanted])}\{{([^}}]*)\}} (\S+)$', text, re.M)
    assert f'model_name="{MODEL}"' in line.group(1) and float(line.group(2)) >= 0
    # the endpoint picker's gauges, under both of vLLM's names for the KV cache
    for name in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        assert re.search(rf"^{name}\{{", text, re.M), name


def test_the_adapter_reading_would_catch_a_missing_gauge():
    (rule,) = yaml.safe_load(open(os.path.join(MISSION, "adapter-rules.yaml")))["rules"]
    only_vidya = 'vidya:num_requests_running{model_name="m"} 0.0\n'
    assert adapter_metrics(rule, only_vidya) == {}
    assert adapter_metrics(rule, 'vllm:num_requests_running{model_name="m"} 0.0\n') == {
        "vllm_requests_running": "vllm:num_requests_running"}


def test_the_mission_client_snippet_gets_an_answer(mission_server):
    s, _ = mission_server
    from openai import OpenAI
    client = OpenAI(base_url=s.url + "/v1", api_key="EMPTY")
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "You are a patient Hindi tutor for class 8 students."},
                  {"role": "user", "content": "प्रकाश संश्लेषण क्या है?"}],
        temperature=0.7, max_tokens=400)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length") and 0 < reply.usage.completion_tokens <= 400
    assert reply.model == MODEL


DOCKERFILE_CUDA = os.path.join(os.path.dirname(MISSION), "..", "deploy", "docker", "Dockerfile.cuda")


def docker_run_args() -> list[str]:
    """The arguments after the image in the `docker run` line Dockerfile.cuda's header documents
    (the mission's own line, with vidya's image), and the -v mount's container side."""
    lines = [l.lstrip("#").strip().rstrip("\\").strip() for l in open(DOCKERFILE_CUDA) if l.startswith("#")]
    start = next(i for i, l in enumerate(lines) if l.startswith("docker run"))
    words = " ".join(lines[start:start + 2]).split()
    mount = words[words.index("-v") + 1].split(":")[1]
    return words[words.index("vidya:cuda") + 1:], mount


def fake_hub_cache(home, repo_id: str, model_dir: str, **config) -> None:
    """A Hugging Face cache (HF_HOME layout) holding `model_dir` as `repo_id`'s main revision."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    shutil.copytree(model_dir, snap)
    cfg = json.loads((snap / "config.json").read_text())
    (snap / "config.json").write_text(json.dumps({**cfg, **config}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_the_mission_docker_run_serves_the_model_from_the_mounted_cache(tiny_models, tmp_path):
    args, mount = docker_run_args()
    assert args[:2] == ["--model", MODEL] and mount == "/root/.cache/huggingface"
    image_env = dict(re.findall(r"^\s*(?:ENV )?(\w+)=(\S+)", open(DOCKERFILE_CUDA).read(), re.M))
    assert image_env["HF_HOME"] == mount  # the image looks where the mission mounts its cache
    # the cache the mission mounts (here a folder standing for it), holding the model: no fetch, no hub
    fake_hub_cache(tmp_path, MODEL, tiny_models["llama"][0], max_position_embeddings=4096)
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "0", "VIDYA_REQUIRE_GPU": image_env["VIDYA_REQUIRE_GPU"]}
    r = subprocess.run([sys.executable, "-m", "vidya.cli", "serve", *args], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **env})
    assert r.returncode == 2 and "no GPU is visible" in r.stderr and "--device cpu" in r.stderr, r.stderr
    s = LiveServer(*args, "--device", "cpu", "--dtype", "float32", "--no-tutor-warmup", "--kv-cache-memory", "1",
                   env=env)  # (on this machine without a GPU, as the refusal says)
    try:
        from openai import OpenAI
        client = OpenAI(base_url=s.url + "/v1", api_key="EMPTY")
        assert client.models.list().data[0].id == MODEL
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        s.terminate()


def test_a_model_missing_from_the_cache_offline_names_the_cache_and_the_mount(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "vidya.cli", "serve", "--model", MODEL], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert str(tmp_path) in r.stderr and "HF_HUB_OFFLINE" in r.stderr and "-v ~/.cache/huggingface" in r.stderr


def test_a_gated_model_says_accept_the_license_and_pass_a_token(monkeypatch, tmp_path):
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants, errors
    from vidya.models import loader
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    response = httpx2.Response(401, request=httpx2.Request("GET", f"https://huggingface.co/{MODEL}"))

    def hub(repo_id, local_files_only=False, **kw):  # the hub's answer for a gated repo without a token
        if local_files_only:
            raise errors.LocalEntryNotFoundError("not cached")
        raise errors.GatedRepoError("401 Client Error: access to this model is restricted", response=response)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    with pytest.raises(loader.ModelLoadError, match="gated model: accept its license") as e:
        loader.resolve(MODEL)
    assert "HF_TOKEN" in str(e.value) and "unreachable" not in str(e.value)


def test_a_cached_snapshot_without_its_weights_is_not_served_as_the_model(tiny_models, tmp_path):
    """transformers fetching a config or tokenizer alone leaves a snapshot without weights: the
    cache must not count as holding the model (offline here: the error names the cache, not
    'incomplete weights')."""
    fake_hub_cache(tmp_path, MODEL, tiny_models["llama"][0])
    snapshot = next((tmp_path / "hub").glob("models--*/snapshots/*"))
    (snapshot / "model.safetensors").unlink()
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "vidya.cli", "serve", "--model", MODEL], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 2 and "is not in the Hugging Face cache" in r.stderr, r.stderr
