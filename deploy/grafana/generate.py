#!/usr/bin/env python3
"""Generates deploy/grafana/preauth-sidecar.json (Grafana dashboard, schemaVersion 39).

The JSON is the artefact (import it in Grafana: Dashboards -> New -> Import); this script is how
it is maintained:  python3 deploy/grafana/generate.py  (rewrites the JSON next to it).
Metric names and labels: CONTRACT §9 / src/telemetry/mod.rs. Recording rules used by the SLO
panels (preauth:enforcement_failsafe_ratio:*) come from deploy/prometheus/alerts.yml.
"""
import json
import os

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SEL = 'job=~"$job",instance=~"$instance"'
SEL_SRC = SEL + ',source=~"$source"'
SLO_ERROR_BUDGET = 0.001

panels = []
_next_id = [1]
_y = [0]


def pid():
    _next_id[0] += 1
    return _next_id[0]


def row(title):
    panels.append({"type": "row", "title": title, "id": pid(), "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": _y[0]}, "panels": []})
    _y[0] += 1


class Line:
    """Places panels left to right; wraps at 24 columns."""

    def __init__(self, height):
        self.h, self.x = height, 0

    def place(self, w):
        if self.x + w > 24:
            _y[0] += self.h
            self.x = 0
        pos = {"h": self.h, "w": w, "x": self.x, "y": _y[0]}
        self.x += w
        return pos

    def end(self):
        if self.x:
            _y[0] += self.h
            self.x = 0


def target(expr, legend="", ref="A", instant=False):
    t = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref,
         "range": not instant, "instant": instant}
    return t


def targets(*pairs):
    return [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(pairs)]


def timeseries(line, w, title, tgts, unit="short", desc="", stack=False, thresholds=None, decimals=None,
               min0=True, legend_calcs=("mean", "max", "lastNotNull")):
    fc = {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 10,
                                  "showPoints": "never", "spanNulls": False,
                                  "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                                  "thresholdsStyle": {"mode": "line+area" if thresholds else "off"}},
          "color": {"mode": "palette-classic"}}
    if min0:
        fc["min"] = 0
    if decimals is not None:
        fc["decimals"] = decimals
    fc["thresholds"] = {"mode": "absolute", "steps": thresholds or [{"color": "green", "value": None}]}
    panels.append({
        "type": "timeseries", "title": title, "id": pid(), "datasource": DS, "description": desc,
        "gridPos": line.place(w), "targets": tgts,
        "fieldConfig": {"defaults": fc, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                               "calcs": list(legend_calcs)},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    })


def stat(line, w, title, expr, unit="short", desc="", steps=None, mappings=None, decimals=None, legend=""):
    fc = {"unit": unit, "color": {"mode": "thresholds"},
          "thresholds": {"mode": "absolute", "steps": steps or [{"color": "green", "value": None}]},
          "mappings": mappings or []}
    if decimals is not None:
        fc["decimals"] = decimals
    panels.append({
        "type": "stat", "title": title, "id": pid(), "datasource": DS, "description": desc,
        "gridPos": line.place(w), "targets": [target(expr, legend, instant=True)],
        "fieldConfig": {"defaults": fc, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "none", "justifyMode": "auto",
                    "textMode": "auto", "orientation": "auto"},
    })


def bargauge(line, w, title, expr, legend, unit="short", desc=""):
    panels.append({
        "type": "bargauge", "title": title, "id": pid(), "datasource": DS, "description": desc,
        "gridPos": line.place(w), "targets": [target(expr, legend, instant=True)],
        "fieldConfig": {"defaults": {"unit": unit, "min": 0, "color": {"mode": "continuous-BlYlRd"},
                                     "thresholds": {"mode": "absolute",
                                                    "steps": [{"color": "green", "value": None}]}},
                        "overrides": []},
        "options": {"displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
    })


ONOFF = [{"type": "value", "options": {"0": {"text": "OFF", "color": "green", "index": 0},
                                       "1": {"text": "ON", "color": "red", "index": 1}}}]
RED_AT_1 = [{"color": "green", "value": None}, {"color": "red", "value": 1}]

# ------------------------------------------------------------------------------------- overview
row("Overview")
l = Line(4)
stat(l, 3, "Decisions / s", f"sum(rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL_SRC}}}[5m]))",
     unit="reqps", desc="All enforcement decisions (ALLOW, DENY, REQUIRE_APPROVAL), both paths.")
stat(l, 3, "Failsafe ratio (1h)",
     f"sum(rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL_SRC},path=\"failsafe\"}}[1h]))"
     f" / sum(rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL_SRC}}}[1h]))",
     unit="percentunit", decimals=3,
     desc="Share of decisions taken on the failsafe path. SLO: <= 0.1 %. Fast burn alert at 1.44 %, slow at 0.6 %.",
     steps=[{"color": "green", "value": None}, {"color": "orange", "value": 6 * SLO_ERROR_BUDGET},
            {"color": "red", "value": 14.4 * SLO_ERROR_BUDGET}])
stat(l, 3, "Error budget left (30d)",
     f"1 - (sum(increase(valdrics_ops_enforcement_gate_decisions_total{{{SEL},path=\"failsafe\"}}[30d]))"
     f" / sum(increase(valdrics_ops_enforcement_gate_decisions_total{{{SEL}}}[30d]))) / {SLO_ERROR_BUDGET}",
     unit="percentunit", decimals=1,
     desc="Remaining share of the 30-day error budget (0.1 % failsafe decisions).",
     steps=[{"color": "red", "value": None}, {"color": "orange", "value": 0.25}, {"color": "green", "value": 0.5}])
stat(l, 3, "Kill switch", f"max(preauth_kill_switch_enabled{{{SEL}}})", mappings=ONOFF, steps=RED_AT_1,
     desc="ON = every LLM request refused (429 global_abuse_kill_switch). Max over the selected replicas.")
stat(l, 3, "Global block", f"max(preauth_global_block_active{{{SEL}}})", mappings=ONOFF, steps=RED_AT_1,
     desc="ON = a global abuse block is in force on at least one replica (429 global_abuse_temporal_block).")
stat(l, 3, "Policy version", f"max(preauth_policy_version{{{SEL}}})",
     desc="Runtime policy version (bumped by every PATCH /api/v1/enforcement/runtime).")
stat(l, 3, "Pending approvals", f"sum(valdrics_ops_enforcement_approval_queue_backlog{{{SEL}}})",
     steps=[{"color": "green", "value": None}, {"color": "orange", "value": 10}])
stat(l, 3, "Reservations active", f"sum(preauth_reservations_active{{{SEL}}})",
     desc="Holds reserved and not yet settled or released.")
l.end()

# ------------------------------------------------------------------------------------- decisions
row("Decisions")
l = Line(8)
timeseries(l, 12, "Decisions by decision / path",
           targets((f"sum by (decision, path) (rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL_SRC}}}[$__rate_interval]))",
                    "{{decision}} / {{path}}")),
           unit="reqps", stack=True)
timeseries(l, 12, "Top reasons (top 10)",
           targets((f"topk(10, sum by (reason) (rate(valdrics_ops_enforcement_gate_decision_reasons_total{{{SEL_SRC}}}[$__rate_interval])))",
                    "{{reason}}")),
           unit="reqps",
           desc="Reason codes attached to decisions (deny reasons, soft_mode_*, shadow_mode_*_override, clamps). "
                "A single reason spiking = candidate false-positive block (RUNBOOK scenario 2).")
timeseries(l, 12, "Decisions by source",
           targets((f"sum by (source, decision) (rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL_SRC}}}[$__rate_interval]))",
                    "{{source}} {{decision}}")),
           unit="reqps")
timeseries(l, 12, "Gate failures by type",
           targets((f"sum by (failure_type) (rate(valdrics_ops_enforcement_gate_failures_total{{{SEL_SRC}}}[$__rate_interval]))",
                    "{{failure_type}}")),
           unit="reqps", desc="Decisions that could not be made normally (store error/timeout, gate timeout).")
l.end()

# ------------------------------------------------------------------------------------- latency & SLO
row("Latency and SLO")
l = Line(8)
timeseries(l, 12, "Gate latency p50 / p99",
           targets(
               (f"histogram_quantile(0.50, sum by (le, path) (rate(valdrics_ops_enforcement_gate_latency_seconds_bucket{{{SEL_SRC}}}[$__rate_interval])))",
                "p50 {{path}}"),
               (f"histogram_quantile(0.99, sum by (le, path) (rate(valdrics_ops_enforcement_gate_latency_seconds_bucket{{{SEL_SRC}}}[$__rate_interval])))",
                "p99 {{path}}")),
           unit="s", desc="Identity to decision, excluding the upstream. Buckets 100 µs .. 5 s. "
                          "PREAUTH_GATE_TIMEOUT_MS (default 50 ms) bounds the normal path.",
           thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 0.05}])
timeseries(l, 12, "Failsafe ratio vs SLO",
           targets(
               (f"sum(rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL_SRC},path=\"failsafe\"}}[5m])) / sum(rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL_SRC}}}[5m]))", "5m"),
               (f"sum(rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL_SRC},path=\"failsafe\"}}[1h])) / sum(rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL_SRC}}}[1h]))", "1h"),
               (f"sum(rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL_SRC},path=\"failsafe\"}}[6h])) / sum(rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL_SRC}}}[6h]))", "6h"),
               (f"vector({14.4 * SLO_ERROR_BUDGET})", "fast burn threshold (14.4x)"),
               (f"vector({6 * SLO_ERROR_BUDGET})", "slow burn threshold (6x)"),
               (f"vector({SLO_ERROR_BUDGET})", "SLO (0.1 %)")),
           unit="percentunit", decimals=3,
           desc="Burn-rate alerts: fast = 1h AND 5m above 1.44 % (>= 100 decisions/h); slow = 6h AND 30m above 0.6 % "
                "(>= 600 decisions/6h). Any firing burn alert blocks release promotion (RUNBOOK release-gate rule).")
l.end()

# ------------------------------------------------------------------------------------- abuse / fair use
row("Abuse guards and fair use")
l = Line(8)
timeseries(l, 8, "Fair-use denials by gate",
           targets((f"sum by (gate) (rate(valdrics_ops_llm_fair_use_denials_total{{{SEL}}}[$__rate_interval]))", "{{gate}}")),
           unit="reqps", stack=True,
           desc="gate=global_abuse covers the kill switch, global block and burst detection.")
timeseries(l, 8, "Fair-use denials by tier",
           targets((f"sum by (tenant_tier) (rate(valdrics_ops_llm_fair_use_denials_total{{{SEL}}}[$__rate_interval]))", "{{tenant_tier}}")),
           unit="reqps", stack=True)
timeseries(l, 8, "Fair-use denial share of decisions",
           targets((f"sum(rate(valdrics_ops_llm_fair_use_denials_total{{{SEL},gate!=\"global_abuse\"}}[10m])) / sum(rate(valdrics_ops_enforcement_gate_decisions_total{{{SEL}}}[10m]))",
                    "fair-use denials / decisions (10m)")),
           unit="percentunit", thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 0.10}],
           desc="PreauthFairUseDenialSurge fires above 10 % for 5m with >= 200 decisions in 10m.")
timeseries(l, 12, "Pre-auth denials by reason",
           targets((f"sum by (reason) (rate(valdrics_ops_llm_pre_auth_denials_total{{{SEL}}}[$__rate_interval]))", "{{reason}}")),
           unit="reqps", desc="Includes would-deny (shadow) decisions.")
timeseries(l, 12, "Fair-use evaluations (deny share by gate)",
           targets((f"sum by (gate) (rate(valdrics_ops_llm_fair_use_evaluations_total{{{SEL},outcome=\"deny\"}}[$__rate_interval])) / sum by (gate) (rate(valdrics_ops_llm_fair_use_evaluations_total{{{SEL}}}[$__rate_interval]))",
                    "{{gate}}")),
           unit="percentunit")
l.end()

# ------------------------------------------------------------------------------------- spend
row("Spend")
l = Line(8)
timeseries(l, 12, "Spend USD/h by provider",
           targets((f"sum by (provider) (rate(valdrics_ops_llm_spend_usd_total{{{SEL}}}[$__rate_interval])) * 3600", "{{provider}}")),
           unit="currencyUSD", stack=True, decimals=2)
timeseries(l, 12, "Spend USD/h by model (top 10)",
           targets((f"topk(10, sum by (provider, model) (rate(valdrics_ops_llm_spend_usd_total{{{SEL}}}[$__rate_interval]))) * 3600",
                    "{{provider}}/{{model}}")),
           unit="currencyUSD", decimals=2, desc="Models outside the price table are labelled other.")
timeseries(l, 12, "Spend USD/h by tier",
           targets((f"sum by (tenant_tier) (rate(valdrics_ops_llm_spend_usd_total{{{SEL}}}[$__rate_interval])) * 3600", "{{tenant_tier}}")),
           unit="currencyUSD", stack=True, decimals=2)
bargauge(l, 12, "Spend over the dashboard range by model",
         f"topk(15, sum by (provider, model) (increase(valdrics_ops_llm_spend_usd_total{{{SEL}}}[$__range])))",
         "{{provider}}/{{model}}", unit="currencyUSD")
l.end()

# ------------------------------------------------------------------------------------- reservations
row("Reservations, drift and approvals")
l = Line(8)
timeseries(l, 8, "Drift USD/h by direction",
           targets((f"sum by (direction) (rate(valdrics_ops_enforcement_reservation_drift_usd_total{{{SEL}}}[$__rate_interval])) * 3600",
                    "{{direction}}")),
           unit="currencyUSD", decimals=2,
           desc="overage = actual above reserved (estimator too low; PreauthReservationDriftSurge above 5 USD/h); "
                "savings = the normal direction (holds are worst case).")
timeseries(l, 8, "Reconciliations by trigger / status",
           targets((f"sum by (trigger, status) (rate(valdrics_ops_enforcement_reservation_reconciliations_total{{{SEL}}}[$__rate_interval]))",
                    "{{trigger}} / {{status}}")),
           unit="ops", desc="usage = settled from the response; manual = admin reconcile; auto/auto_release = TTL sweep.")
timeseries(l, 8, "Reservations active",
           targets((f"sum by (instance) (preauth_reservations_active{{{SEL}}})", "{{instance}}")),
           unit="short")
timeseries(l, 12, "Approval token events",
           targets((f"sum by (event) (rate(valdrics_ops_enforcement_approval_token_events_total{{{SEL}}}[$__rate_interval]))", "{{event}}")),
           unit="ops", desc="invalid / mismatch / expired / replay = refused tokens (RUNBOOK scenario 3).")
timeseries(l, 12, "Approval queue backlog",
           targets((f"sum(valdrics_ops_enforcement_approval_queue_backlog{{{SEL}}})", "pending")),
           unit="short")
l.end()

# ------------------------------------------------------------------------------------- outbox / store / upstream
row("Outbox, state store and upstream")
l = Line(8)
timeseries(l, 8, "Outbox depth",
           targets((f"sum by (instance) (preauth_outbox_depth{{{SEL}}})", "{{instance}}")), unit="short")
timeseries(l, 8, "Outbox oldest undelivered event age",
           targets((f"max by (instance) (preauth_outbox_oldest_age_seconds{{{SEL}}})", "{{instance}}")),
           unit="s", thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 300}],
           desc="PreauthOutboxBacklogAge fires above 300 s for 5m.")
timeseries(l, 8, "Outbox events by state",
           targets((f"sum by (state) (rate(preauth_outbox_events_total{{{SEL}}}[$__rate_interval]))", "{{state}}")),
           unit="ops", desc="appended / delivered / dropped (dropped only with PREAUTH_OUTBOX_FULL_POLICY=drop).")
timeseries(l, 8, "State store errors by operation",
           targets((f"sum by (op) (rate(preauth_store_errors_total{{{SEL}}}[$__rate_interval]))", "{{op}}")),
           unit="ops", thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 0.0001}])
timeseries(l, 8, "Upstream responses by status class",
           targets((f"sum by (status_class) (rate(preauth_upstream_responses_total{{{SEL}}}[$__rate_interval]))", "{{status_class}}")),
           unit="reqps", stack=True, desc="error = no response (upstream unreachable or protocol error: 502 upstream_unavailable).")
timeseries(l, 12, "Tenants tracked",
           targets((f"sum by (instance, store) (preauth_tenants_tracked{{{SEL}}})", "{{instance}} {{store}}")),
           unit="short")
timeseries(l, 12, "Config reloads (SIGHUP) by result",
           targets((f"sum by (instance, result) (increase(preauth_config_reloads_total{{{SEL}}}[$__rate_interval]))", "{{instance}} {{result}}")),
           unit="short", desc="result=error: the tenants/tiers/pricing file was rejected and the old tables stay in force.")
l.end()


def query_var(name, label, query, include_all=True, multi=True):
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "sort": 1, "multi": multi, "includeAll": include_all,
            "allValue": ".*" if include_all else None,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if include_all else {},
            "hide": 0, "options": [], "regex": ""}


dashboard = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "description": "", "type": "datasource",
                  "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
                   {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}],
    "id": None,
    "uid": "preauth-sidecar",
    "title": "preauth-sidecar — LLM pre-authorization",
    "description": "Decisions, reasons, latency, SLO burn, fair use, spend, drift, approvals, outbox and state store "
                   "of preauth-sidecar (CONTRACT §9 metrics). Runbook: deploy/RUNBOOK.md.",
    "tags": ["preauth-sidecar", "llm", "enforcement"],
    "timezone": "utc",
    "editable": True,
    "graphTooltip": 1,
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "timepicker": {},
    "fiscalYearStartMonth": 0,
    "liveNow": False,
    "weekStart": "",
    "links": [{"title": "Runbook", "type": "link", "icon": "doc", "targetBlank": True, "tooltip": "deploy/RUNBOOK.md",
               "url": "https://github.com/preauth-sidecar/preauth-sidecar/blob/main/deploy/RUNBOOK.md"}],
    "annotations": {"list": [
        {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
         "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"},
        {"datasource": DS, "enable": True, "hide": False, "iconColor": "orange", "name": "Policy changes",
         "expr": f"changes(max(preauth_policy_version{{{SEL}}})[2m:]) > 0", "step": "1m",
         "titleFormat": "Runtime policy changed", "textFormat": "PATCH /api/v1/enforcement/runtime"},
    ]},
    "templating": {"list": [
        {"name": "DS_PROMETHEUS", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False, "multi": False},
        query_var("job", "Job", "label_values(valdrics_ops_enforcement_gate_decisions_total, job)"),
        query_var("instance", "Instance", 'label_values(valdrics_ops_enforcement_gate_decisions_total{job=~"$job"}, instance)'),
        query_var("source", "Source", 'label_values(valdrics_ops_enforcement_gate_decisions_total{job=~"$job",instance=~"$instance"}, source)'),
    ]},
    "panels": panels,
}

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preauth-sidecar.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(dashboard, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {out}: {sum(1 for p in panels if p['type'] != 'row')} panels in "
          f"{sum(1 for p in panels if p['type'] == 'row')} rows")
