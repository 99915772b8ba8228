"""The alert rules and the dashboard's queries, through promtool (Debian's `prometheus` package;
.ci/run installs it): the rules load, each alert fires on the series of alerts_test.yml (and a rule
whose threshold is broken makes that test fail), and every Grafana query is valid PromQL."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import DEPLOY

PROM = DEPLOY / "prometheus"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="install prometheus (promtool): apt-get install prometheus")


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_rules_and_config_pass_promtool_check() -> None:
    for args in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_the_rule_tests(yaml_load) -> None:
    (rules,) = yaml_load(PROM / "alerts.yml")
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    (tests,) = yaml_load(PROM / "alerts_test.yml")
    firing = {c["alertname"] for t in tests["tests"] for c in t["alert_rule_test"] if c["exp_alerts"]}
    assert firing == alerts
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("old, new", [("(3 * max", "(10 * max"), ("(3 * max", "(0.5 * max"),
                                      ("for: 10m", "for: 30m"),
                                      ("> 0.5\n", "> 2\n"), ("increase(rwood_worker_restarts_total",
                                                             "increase(rwood_worker_restart_total")])
def test_a_broken_rule_fails_the_rule_tests(tmp_path: Path, old: str, new: str) -> None:
    text = (PROM / "alerts.yml").read_text()
    assert old in text
    (tmp_path / "alerts.yml").write_text(text.replace(old, new, 1))
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "reweightood.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    import yaml

    queries = dashboard_queries()
    assert len(queries) >= 15
    rules = [{"record": f"dashboard:query_{i}",
              "expr": q.replace("$__rate_interval", "5m").replace("$job", ".*")}
             for i, q in enumerate(queries)]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}))
    result = promtool("check", "rules", "queries.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
