"""deploy/: every kustomize overlay renders and validates against the Kubernetes schemas (strict),
the Dockerfiles pass hadolint, the grace periods fit the drain, and the probe paths, the
autoscaler's metric and the dashboard's queries all exist on a live `vidya serve`."""
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
OVERLAYS = ("overlays/cpu", "overlays/gpu-a10", "overlays/gpu-a100x4", "monitoring")
K8S_VERSION = "1.33.0"
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.cuda")


def tool(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), name)  # installed into the venv by `make test`
    return path if os.path.exists(path) else shutil.which(name) or pytest.fail(f"{name} is not installed")


def render(overlay: str) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", os.path.join(DEPLOY, "k8s", overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def of_kind(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def check_service_monitor(sm: dict, service: dict) -> None:
    """No published schema for the Prometheus Operator's CRD here: check what it must say."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and set(sm) <= {"apiVersion", "kind", "metadata", "spec"}
    labels = service["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay):
    docs = render(overlay)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc, of_kind(docs, "Service"))
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_would_catch_a_mistake():
    deployment = of_kind(render("overlays/cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu-a10", "overlays/gpu-a100x4"])
def test_rollouts_never_cut_an_answer(overlay):
    docs = render(overlay)
    pod = of_kind(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    shutdown = float(args[args.index("--shutdown-timeout") + 1])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + shutdown + 5
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > shutdown  # a drain never looks dead
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 300
    hpa = of_kind(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["minReplicas"] == 1 and hpa["maxReplicas"] > 1  # the CPU overlay's ceiling is the plan's (below)
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 1800
    pdb = of_kind(docs, "PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] >= 1
    if overlay.endswith("gpu-a10"):
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10"}
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile):
    out = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "error",
                          os.path.join(DEPLOY, "docker", dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = open(os.path.join(DEPLOY, "docker", dockerfile)).read()
    assert re.search(r"^USER 10001$", text, re.M)  # non-root, numeric
    assert 'ENTRYPOINT ["vidya", "serve"' in text


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install x\nCOPY a b c\n")
    out = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "error", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0


def test_probe_paths_and_the_autoscaler_metric_answer_on_a_live_server(server):
    docs = render("overlays/cpu")
    container = of_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert httpx.get(server.url + path, timeout=10).status_code == 200, probe
    sm = of_kind(docs, "ServiceMonitor")
    r = httpx.get(server.url + sm["spec"]["endpoints"][0]["path"], timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")

    hpa_metric = of_kind(docs, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load(of_kind(render("monitoring"), "ConfigMap")["data"]["config.yaml"])
    (rule,) = [r for r in adapter["rules"] if r["name"]["as"] == hpa_metric]
    series = re.match(r"^([a-z_:]+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    assert series == "vidya:num_requests_running"
    assert server.metric(series.removeprefix("vidya:"), model_name="smollm2") >= 0  # exported, with its label


def test_dashboard_queries_only_metrics_the_server_exports(server):
    with open(os.path.join(DEPLOY, "grafana", "dashboards", "vidya.json")) as f:
        dash = json.load(f)
    exported = set(re.findall(r"^(vidya:[a-z_]+)", httpx.get(server.url + "/metrics").text, re.M))
    titles = [p["title"].lower() for p in dash["panels"]]
    for want in ("running", "kv cache", "prefix", "first token", "inter-token", "end-to-end", "tokens per second",
                 "preemptions"):
        assert any(want in t for t in titles), want
    for p in dash["panels"]:
        for t in p["targets"]:
            for name in re.findall(r"vidya:[a-z_]+", t["expr"]):
                assert name in exported, f"panel {p['title']!r} queries {name}, which /metrics does not export"


def test_compose_wires_vidya_prometheus_and_grafana():
    with open(os.path.join(DEPLOY, "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    services = compose["services"]
    assert set(services) == {"vidya", "prometheus", "grafana"}
    assert services["vidya"]["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"
    assert "/health" in " ".join(services["vidya"]["healthcheck"]["test"])
    with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["vidya:8000"]
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        assert os.path.exists(os.path.join(DEPLOY, volume.split(":")[0]))


def plan_on(sweep_file: str, *flags: str) -> dict:
    """`vidya plan --json` on a sweep stored in bench/results, through the CLI."""
    import json
    sweep = os.path.join(os.path.dirname(DEPLOY), "bench", "results", sweep_file)
    vidya = os.path.join(os.path.dirname(sys.executable), "vidya")
    out = subprocess.run([vidya, "plan", "--sweep", sweep, *flags, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_cpu_overlay_scales_where_the_plan_says():
    """The CPU overlay's HPA target and pod ceiling are `vidya plan`'s on the stored sweep its
    comment names: re-run the sweep or change the plan, and this says the overlay is stale."""
    plan = plan_on("sweep-epyc-avx2-smollm2.json", "--replica-cost-per-month", "3000")
    hpa = of_kind(render("overlays/cpu"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == str(plan["hpa_target_running_per_pod"])
    assert hpa["spec"]["maxReplicas"] == plan["replicas"]


def test_the_gpu_overlay_scales_where_the_plan_says():
    """The gpu-a10 overlay's HPA target is `vidya plan`'s on the stored GPU sweep its comment
    names (an H200 held to 24 GB; the TTFT target scaled to that GPU's speed)."""
    plan = plan_on("gpu-sweep-24gb-h200.json", "--p99-ttft", "0.2")
    hpa = of_kind(render("overlays/gpu-a10"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == str(plan["hpa_target_running_per_pod"]) == "64"


def test_the_70b_overlay_splits_the_model_across_the_pods_four_gpus():
    """gpu-a100x4: --tensor-parallel-size equals the GPUs the pod asks for, and NCCL gets a
    memory-backed /dev/shm larger than the container default."""
    docs = render("overlays/gpu-a100x4")
    pod = of_kind(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    tp = int(args[args.index("--tensor-parallel-size") + 1])
    assert tp == 4 == int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert "70B" in args[args.index("--model") + 1]
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == shm[0]["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
