#!/usr/bin/env python3
"""Writes deploy/grafana/dashboards/tessera.json, the Grafana dashboard on the router's
/metrics. The JSON is committed (Grafana provisioning and users import it as is); this
script is its source, so panels stay uniform. scripts/check_deploy.sh fails when the two
differ: edit this file, run it, commit both.

    python3 deploy/grafana/make_dashboard.py            # rewrite the JSON
    python3 deploy/grafana/make_dashboard.py --check    # exit 1 if it is stale

Every query filters on the `instance` and `replica` variables and uses Grafana's
`$__rate_interval`; tests/tests/deploy_dashboard.rs evaluates each one on a real
Prometheus scraping a live `tessera serve`.
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "tessera.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
INST = 'instance=~"$instance"'
REPL = 'instance=~"$instance", replica=~"$replica"'


class Layout:
    """Hands out panel ids and grid positions, row by row (the grid is 24 wide)."""

    def __init__(self):
        self.panels = []
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def _id(self):
        self.next_id += 1
        return self.next_id - 1

    def row(self, title):
        self._newline()
        self.panels.append({
            "type": "row", "id": self._id(), "title": title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": [],
        })
        self.y += 1

    def _newline(self):
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def add(self, panel, w, h):
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def target(expr, legend, ref):
    return {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend,
            "range": True, "instant": False, "editorMode": "code"}


def targets(queries):
    return [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(queries)]


def timeseries(title, description, queries, unit, *, minimum=0, maximum=None, stack=False):
    defaults = {
        "unit": unit,
        "min": minimum,
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                   "showPoints": "never", "spanNulls": False,
                   "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
        "color": {"mode": "palette-classic"},
    }
    if maximum is not None:
        defaults["max"] = maximum
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "targets": targets(queries),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title, description, expr, unit, *, thresholds=None, decimals=None):
    steps = thresholds or [{"color": "green", "value": None}]
    defaults = {"unit": unit, "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": steps}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "targets": targets([(expr, "")]),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
                    "orientation": "auto", "textMode": "auto"},
    }


def health_timeline(title, description, expr, legend):
    return {
        "type": "state-timeline", "title": title, "description": description, "datasource": DS,
        "targets": targets([(expr, legend)]),
        "fieldConfig": {"defaults": {
            "min": 0, "max": 1, "color": {"mode": "thresholds"},
            "thresholds": {"mode": "absolute", "steps": [
                {"color": "red", "value": None}, {"color": "green", "value": 1}]},
            "mappings": [{"type": "value", "options": {
                "0": {"text": "down", "color": "red", "index": 0},
                "1": {"text": "healthy", "color": "green", "index": 1}}}],
        }, "overrides": []},
        "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.9,
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
                    "tooltip": {"mode": "single", "sort": "none"}},
    }


def quantiles(metric, by="le", selector=INST, legend_prefix=""):
    """p50, p90 and p99 of a histogram, aggregated over everything but `by`."""
    return [(f"histogram_quantile({q}, sum by ({by}) "
             f"(rate({metric}_bucket{{{selector}}}[{RATE}])))", f"{legend_prefix}p{int(q * 100)}")
            for q in (0.5, 0.9, 0.99)]


def mean(metric, by=None, selector=INST):
    group = f" by ({by})" if by else ""
    return (f"sum{group} (rate({metric}_sum{{{selector}}}[{RATE}])) / "
            f"sum{group} (rate({metric}_count{{{selector}}}[{RATE}]))")


def kv_usage(by=None):
    group = f" by ({by})" if by else ""
    used = f"sum{group} (tessera_kv_cache_blocks_used{{{REPL}}})"
    free = f"sum{group} (tessera_kv_cache_blocks_free{{{REPL}}})"
    return f"{used} / ({used} + {free})"


def build():
    g = Layout()
    requests = f"sum(rate(tessera_requests_total{{{INST}}}[{RATE}]))"
    errors = f'sum(rate(tessera_requests_total{{{INST}, outcome!="success"}}[{RATE}]))'

    g.row("Overview")
    g.add(stat("Requests / s", "Finished requests per second, every outcome.",
               requests, "reqps", decimals=2), 4, 4)
    g.add(stat("Error ratio", "Share of finished requests that ended in an error.",
               f"({errors} or vector(0)) / {requests}", "percentunit", decimals=1,
               thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.01},
                           {"color": "red", "value": 0.05}]), 4, 4)
    g.add(stat("Generated tokens / s", "Tokens generated per second, all requests.",
               f"sum(rate(tessera_request_generated_tokens_sum{{{INST}}}[{RATE}]))",
               "short", decimals=1), 4, 4)
    g.add(stat("TTFT p90", "90th percentile of the time to the first token.",
               quantiles("tessera_request_time_to_first_token_seconds")[1][0], "s"), 4, 4)
    g.add(stat("Healthy replicas", "Shard groups that answer their health checks.",
               f"sum(tessera_shard_healthy{{{REPL}}})", "short",
               thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]), 4, 4)
    g.add(stat("KV cache usage", "KV cache blocks held by running requests, of all blocks.",
               kv_usage(), "percentunit", decimals=1,
               thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 0.8},
                           {"color": "red", "value": 0.95}]), 4, 4)

    g.row("Throughput")
    g.add(timeseries("Requests / s by outcome",
                     "Finished requests per second: `success` or the error type "
                     "(validation, overloaded, generation, ...).",
                     [(f"sum by (outcome) (rate(tessera_requests_total{{{INST}}}[{RATE}]))",
                       "{{outcome}}")], "reqps", stack=True), 8, 8)
    g.add(timeseries("Tokens / s", "Prompt tokens admitted and tokens generated per second.",
                     [(f"sum(rate(tessera_request_generated_tokens_sum{{{INST}}}[{RATE}]))",
                       "generated"),
                      (f"sum(rate(tessera_request_input_tokens_sum{{{INST}}}[{RATE}]))",
                       "prompt")], "short"), 8, 8)
    g.add(timeseries("Requests / s by replica",
                     "Sequences dispatched to each shard group (one per sequence of n or "
                     "best_of).",
                     [(f"sum by (instance, replica) "
                       f"(rate(tessera_replica_requests_total{{{REPL}}}[{RATE}]))",
                       "{{instance}} replica {{replica}}")], "reqps", stack=True), 8, 8)

    g.row("Latency")
    g.add(timeseries("Time to first token", "From arrival to the first generated token.",
                     quantiles("tessera_request_time_to_first_token_seconds"), "s"), 12, 8)
    g.add(timeseries("Time per output token",
                     "Mean time between a request's generated tokens, after the first.",
                     quantiles("tessera_request_time_per_output_token_seconds"), "s"), 12, 8)
    g.add(timeseries("End-to-end request duration", "From arrival to the last token.",
                     quantiles("tessera_request_duration_seconds"), "s"), 12, 8)
    g.add(timeseries("Queue duration", "Time a request waited before its prefill.",
                     quantiles("tessera_request_queue_duration_seconds"), "s"), 12, 8)
    g.add(timeseries("Mean time per step of a request",
                     "Validation (and tokenization), queue, and inference (prefill to last "
                     "token), averaged over the requests finished in the interval.",
                     [(mean("tessera_request_validation_duration_seconds"), "validation"),
                      (mean("tessera_request_queue_duration_seconds"), "queue"),
                      (mean("tessera_request_inference_duration_seconds"), "inference")],
                     "s", stack=True), 12, 8)
    g.add(timeseries("Tokens per request", "Prompt and generated tokens per request.",
                     quantiles("tessera_request_input_tokens", legend_prefix="prompt ")[0:3:2]
                     + quantiles("tessera_request_generated_tokens",
                                 legend_prefix="generated ")[0:3:2], "short"), 12, 8)

    g.row("Errors")
    g.add(timeseries("Errors / s by type",
                     "Requests that ended in an error, by error type (the `error_type` of "
                     "the response body).",
                     [(f'sum by (outcome) (rate(tessera_requests_total{{{INST}, '
                       f'outcome!="success"}}[{RATE}]))', "{{outcome}}")], "reqps",
                     stack=True), 12, 8)
    g.add(timeseries("Error ratio", "Share of finished requests that ended in an error.",
                     [(f"({errors} or vector(0)) / {requests}", "errors")], "percentunit",
                     maximum=1), 12, 8)

    g.row("Replicas (shard groups)")
    by = "instance, replica"
    legend = "{{instance}} replica {{replica}}"
    g.add(timeseries("Queue size", "Requests waiting for their prefill, per replica.",
                     [(f"sum by ({by}) (tessera_queue_size{{{REPL}}})", legend)], "short"),
          8, 8)
    g.add(timeseries("Running batch size", "Requests in the running batch, per replica.",
                     [(f"sum by ({by}) (tessera_batch_current_size{{{REPL}}})", legend)],
                     "short"), 8, 8)
    g.add(timeseries("KV cache usage", "KV blocks held by running requests, of all blocks "
                     "(used / (used + free)), per replica.",
                     [(kv_usage(by), legend)], "percentunit", maximum=1), 8, 8)
    g.add(health_timeline("Shard health",
                          "1 while the replica's shard group answers health checks.",
                          f"sum by ({by}) (tessera_shard_healthy{{{REPL}}})", legend), 8, 8)
    g.add(timeseries("Forward duration p50 / p99 by phase",
                     "One shard step (forward pass and sampling) per phase and replica.",
                     [(q, "{{phase}} {{instance}} replica {{replica}} " + l)
                      for q, l in quantiles("tessera_batch_forward_duration_seconds",
                                            by="le, phase, instance, replica",
                                            selector=REPL)[0:3:2]], "s"), 8, 8)
    g.add(timeseries("Forward steps / s by phase", "Prefill and decode steps per second.",
                     [(f"sum by (phase, {by}) "
                       f"(rate(tessera_batch_forward_duration_seconds_count{{{REPL}}}[{RATE}]))",
                       "{{phase}} " + legend)], "short"), 8, 8)
    g.add(timeseries("Forward duration p99 by rank",
                     "One step's forward pass and sampling as each shard rank timed it; a rank "
                     "slower than its peers holds the whole group back.",
                     [(q, "{{phase}} replica {{replica}} rank {{rank}} " + l)
                      for q, l in quantiles("tessera_shard_forward_duration_seconds",
                                            by="le, phase, instance, replica, rank",
                                            selector=REPL)[2:3]], "s"), 8, 8)
    g.add(timeseries("Prefix cache hit rate",
                     "Share of admitted prompt tokens whose keys and values came from the "
                     "prefix cache (a shared system prompt, a chat's earlier turns), per "
                     "replica.",
                     [(f"sum by ({by}) (rate(tessera_prefix_cache_hits_tokens_total{{{REPL}}}"
                       f"[{RATE}])) / sum by ({by}) "
                       f"(rate(tessera_prefix_cache_queries_tokens_total{{{REPL}}}[{RATE}]))",
                       legend)], "percentunit", maximum=1), 8, 8)
    return g.panels


def variable(name, label, query, depends=""):
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "definition": query, "query": {"query": query, "refId": f"{name}-query"},
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 3, "hide": 0, "options": [], "regex": "", "skipUrlSync": False,
    }


def dashboard():
    return {
        "uid": "tessera-overview",
        "title": "Tessera",
        "description": "Tessera LLM serving: throughput, latency, errors, and each replica's "
                       "queue, batch, KV cache, health and shard steps (router /metrics).",
        "tags": ["tessera", "llm", "inference"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "refresh": 1, "regex": "", "hide": 0,
             "current": {}, "options": [], "includeAll": False, "multi": False,
             "skipUrlSync": False},
            variable("instance", "Instance", "label_values(tessera_shard_healthy, instance)"),
            variable("replica", "Replica",
                     'label_values(tessera_shard_healthy{instance=~"$instance"}, replica)'),
        ]},
        "panels": build(),
    }


def render():
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    text = render()
    if sys.argv[1:] == ["--check"]:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python3 {Path(__file__).name} and commit it",
                  file=sys.stderr)
            sys.exit(1)
    else:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(text)
