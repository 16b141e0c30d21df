"""Writes deploy/grafana/dashboards/vidya.json, the Grafana dashboard over vidya's metrics.
Run: python deploy/grafana/make_dashboard.py (kept as code so panels stay consistent)."""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}


def quantiles(metric: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate(vidya:{metric}_bucket{{model_name=~\"$model\"}}[5m])))",
             f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)]


PANELS = [  # title, unit, [(expr, legend)]
    ("Requests running and waiting", "short", [
        ("sum(vidya:num_requests_running{model_name=~\"$model\"})", "running"),
        ("sum(vidya:num_requests_waiting{model_name=~\"$model\"})", "waiting")]),
    ("Running requests per pod (the HPA's metric)", "short", [
        ("vidya:num_requests_running{model_name=~\"$model\"}", "{{pod}}")]),
    ("KV cache usage", "percentunit", [
        ("avg(vidya:kv_cache_usage_perc{model_name=~\"$model\"})", "used"),
        ("avg(vidya:kv_cache_waste_perc{model_name=~\"$model\"})", "allocated but empty")]),
    ("Prefix cache hit rate", "percentunit", [
        ("sum(rate(vidya:prefix_cache_hits_total{model_name=~\"$model\"}[5m])) / "
         "sum(rate(vidya:prefix_cache_queries_total{model_name=~\"$model\"}[5m]))", "hit rate")]),
    ("Time to first token", "s", quantiles("time_to_first_token_seconds")),
    ("Inter-token latency", "s", quantiles("inter_token_latency_seconds")),
    ("End-to-end request latency", "s", quantiles("e2e_request_latency_seconds")),
    ("Queue time", "s", quantiles("request_queue_time_seconds")),
    ("Tokens per second", "short", [
        ("sum(rate(vidya:generation_tokens_total{model_name=~\"$model\"}[1m]))", "generated"),
        ("sum(rate(vidya:prompt_tokens_total{model_name=~\"$model\"}[1m]))", "prompt")]),
    ("Finished requests by reason", "reqps", [
        ("sum by (finished_reason) (rate(vidya:request_success_total{model_name=~\"$model\"}[5m]))",
         "{{finished_reason}}")]),
    ("Preemptions", "short", [
        ("sum(increase(vidya:num_preemptions_total{model_name=~\"$model\"}[5m]))", "per 5 min")]),
]


def panel(i: int, title: str, unit: str, targets) -> dict:
    return {"id": i + 1, "type": "timeseries", "title": title, "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"datasource": DS, "expr": e, "legendFormat": leg, "refId": chr(65 + j)}
                        for j, (e, leg) in enumerate(targets)]}


def main() -> None:
    dash = {
        "title": "vidya", "uid": "vidya-serving", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-3h", "to": "now"}, "refresh": "30s", "tags": ["vidya", "llm"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "model", "type": "query", "datasource": DS, "label": "model",
             "query": "label_values(vidya:num_requests_running, model_name)", "includeAll": True,
             "current": {"text": "All", "value": "$__all"}, "allValue": ".*", "refresh": 2}]},
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }
    out = os.path.join(os.path.dirname(__file__), "dashboards", "vidya.json")
    with open(out, "w") as f:
        json.dump(dash, f, indent=1)
    print(f"wrote {out}: {len(PANELS)} panels")


if __name__ == "__main__":
    main()
