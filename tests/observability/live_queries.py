#!/usr/bin/env python3
"""Live half of check.sh: evaluates every dashboard panel query and every alert
expression against a running Prometheus that scrapes rota.

usage: live_queries.py <prometheus-url> <dashboard.json> <alerts.yml> <wait-s> <prometheus-pid>

Prints one PASS/FAIL line per query; exits 1 if any failed.
"""
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

prom, dashboard_path, alerts_path, wait_s, prom_pid = sys.argv[1:6]
deadline = time.monotonic() + float(wait_s)
failures = 0

SUBSTITUTIONS = [
    (re.compile(r"\$\{?__rate_interval\}?"), "1m"),
    (re.compile(r"\$\{?__interval\}?"), "15s"),
    (re.compile(r"\$\{?__range\}?"), "1h"),
    (re.compile(r"\$\{?tenant(?::\w+)?\}?"), ".*"),
]


def line(ok, text):
    global failures
    if not ok:
        failures += 1
    print(("PASS " if ok else "FAIL ") + text, flush=True)


def get(path, params=None):
    url = prom + path + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # 400 on a parse error carries a JSON body
        try:
            return json.load(e)
        except ValueError:
            return {"status": "error", "error": f"HTTP {e.code}"}


def query(expr):
    return get("/api/v1/query", {"query": expr})


def prometheus_alive():
    try:
        os.kill(int(prom_pid), 0)
        return True
    except OSError:
        return False


def wait_for(what, ready):
    while time.monotonic() < deadline:
        if not prometheus_alive():
            line(False, f"prometheus exited while waiting for {what}")
            sys.exit(1)
        try:
            if ready():
                line(True, f"waited for {what}")
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    line(False, f"timed out waiting for {what}")
    sys.exit(1)


def has_data(r):
    return r.get("status") == "success" and len(r["data"]["result"]) > 0


wait_for("prometheus ready", lambda: urllib.request.urlopen(prom + "/-/ready", timeout=2).status == 200)
wait_for("a successful scrape of rota", lambda: has_data(query('up{job="rota"} == 1')))
# rate() needs two samples in its window; wait for a few.
wait_for("three scrapes of rota", lambda: has_data(query("count_over_time(rota_build_info[1m]) >= 3")))


def substitute(expr):
    for pattern, value in SUBSTITUTIONS:
        expr = pattern.sub(value, expr)
    return expr


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


dashboard = json.load(open(dashboard_path))
for var in dashboard.get("templating", {}).get("list", []):
    q = var.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q or "")
    if var.get("type") == "query" and m:
        expr = f"count by ({m.group(2)}) ({substitute(m.group(1))})"
        r = query(expr)
        line(has_data(r), f"variable ${var['name']}: {expr}" + ("" if has_data(r) else f" -> {r.get('error', 'no data')}"))

for p in panels(dashboard.get("panels", [])):
    for t in p.get("targets", []):
        if not t.get("expr"):
            continue
        expr = substitute(t["expr"])
        r = query(expr)
        if r.get("status") != "success":
            line(False, f"panel {p['title']!r} {t['refId']}: {expr} -> {r.get('error')}")
        elif not r["data"]["result"]:
            line(False, f"panel {p['title']!r} {t['refId']}: {expr} -> no data")
        else:
            line(True, f"panel {p['title']!r} {t['refId']}: {len(r['data']['result'])} series")

# Alert rules as the real Prometheus loaded them from alerts.yml.
rules = []
wait_for("alert rules loaded", lambda: bool(get("/api/v1/rules").get("data", {}).get("groups")))
for g in get("/api/v1/rules")["data"]["groups"]:
    for rule in g["rules"]:
        rules.append(rule)
expected = len(re.findall(r"^\s*- alert:", open(alerts_path).read(), re.M))
line(len(rules) == expected, f"{len(rules)} alert rules loaded, {expected} in {os.path.basename(alerts_path)}")
for rule in rules:
    r = query(rule["query"])
    ok = r.get("status") == "success" and rule.get("health") != "err"
    detail = "" if ok else f" -> {r.get('error') or rule.get('lastError')}"
    line(ok, f"alert {rule['name']}: parses ({len(r['data']['result']) if ok else 0} firing series now){detail}")

sys.exit(1 if failures else 0)
