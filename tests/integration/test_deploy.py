"""deploy/: Prometheus config and alert rules (promtool), dashboards, docker-compose and Kubernetes manifests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client import generate_latest

from dealpulse.agents.alerter import AlerterMetrics
from dealpulse.agents.cli import main as cli
from dealpulse.agents.metrics import IngestMetrics
from dealpulse.agents.notifier import NotifierMetrics
from dealpulse.agents.trainer import TrainerMetrics
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
SETTINGS_ENV = {f"DEALPULSE_{name.upper()}" for name in Settings.model_fields}
# variables the ClickHouse / Grafana containers read, not dealpulse settings
NOT_SETTINGS = {"DEALPULSE_BI_PASSWORD"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, check=False)


def exposed_metric_names() -> set[str]:
    """What a worker, the trainer, the alerter and the notifier expose."""
    registries = (IngestMetrics().registry, TrainerMetrics().registry, AlerterMetrics().registry,
                  NotifierMetrics().registry)  # fmt: skip
    text = "".join(generate_latest(registry).decode() for registry in registries)
    return set(re.findall(r"^# TYPE (\w+) ", text, re.MULTILINE))


def metric_names_in(text: str) -> set[str]:
    names = set(re.findall(r"\b(dealpulse_\w+|process_\w+)", text))
    return {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in names}


@pytest.mark.parametrize("args", [("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                                  ("test", "rules", "alerts_test.yml")])  # fmt: skip
def test_promtool(args: tuple[str, ...]) -> None:
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_and_an_explanation() -> None:
    rules = [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    tested = (PROMETHEUS / "alerts_test.yml").read_text()
    for rule in rules:
        assert f"alertname: {rule['alert']}" in tested, rule["alert"]
        assert rule["labels"]["severity"] in {"page", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_and_dashboards_use_metrics_the_worker_exposes() -> None:
    exposed = {re.sub(r"_total$", "", name) for name in exposed_metric_names()}
    used = metric_names_in((PROMETHEUS / "alerts.yml").read_text())
    for dashboard in DASHBOARDS:
        used |= metric_names_in(dashboard.read_text())
    assert used, "no metric names found"
    assert used <= exposed, f"not exposed by the worker: {sorted(used - exposed)}"


def test_dashboards_are_well_formed() -> None:
    assert {d.name for d in DASHBOARDS} == {"dealpulse-ops.json", "dealpulse-sales.json"}
    for path in DASHBOARDS:
        dashboard = orjson.loads(path.read_bytes())
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)) and dashboard["uid"] and dashboard["title"]
        provisioned = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/dealpulse.yml").read_text())
        uids = {source["uid"] for source in provisioned["datasources"]}
        assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} <= uids


def grafana_sql(sql: str, database: str) -> str:
    """Expand the Grafana ClickHouse macros the dashboards use, the way the plugin does."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= toDateTime64('2000-01-01 00:00:00', 3) AND \1 <= now64(3)", sql)
    return sql.replace("dealpulse.", f"{database}.")


def test_sales_dashboard_queries_run_on_the_store(settings: Settings, store: Store) -> None:
    dashboard = orjson.loads((ROOT / "deploy/grafana/dashboards/dealpulse-sales.json").read_bytes())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            store.query_rows(grafana_sql(target["rawSql"], settings.clickhouse_database))


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_services_env_paths_and_order() -> None:
    data = compose()
    services = data["services"]
    assert {"kafka", "clickhouse", "migrate", "worker", "prometheus", "grafana", "generator"} <= set(services)
    for name, service in services.items():
        env = service.get("environment") or {}
        for key in env:
            if key.startswith("DEALPULSE_"):
                assert key in SETTINGS_ENV | NOT_SETTINGS, f"{name}: {key} is not a setting"
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert (ROOT / host).exists(), f"{name}: {host} does not exist"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for port in service.get("ports", []):
            outside, inside = str(port).split(":")
            assert 0 < int(outside) < 65536 and 0 < int(inside) < 65536
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert "container_name" not in services["worker"], "a container_name would forbid --scale worker=N"


def test_compose_and_kubernetes_run_real_cli_commands() -> None:
    commands = [service["command"][0] for service in compose()["services"].values()
                if service.get("build") and service.get("command")]  # fmt: skip
    for document in yaml.safe_load_all((ROOT / "deploy/k8s/dealpulse.yaml").read_text()):
        spec = document.get("spec", {}).get("template", {}).get("spec", {})
        commands += [c["args"][0] for c in spec.get("containers", [])]
    assert set(commands) >= {"migrate", "worker", "generate"}
    for command in commands:
        assert command in cli.commands, command  # type: ignore[attr-defined]


def test_kubernetes_settings_are_real_settings() -> None:
    documents = list(yaml.safe_load_all((ROOT / "deploy/k8s/dealpulse.yaml").read_text()))
    config = next(d for d in documents if d["kind"] == "ConfigMap")
    assert set(config["data"]) <= SETTINGS_ENV
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Job", "Service", "ConfigMap"} <= kinds


def test_clickhouse_users_have_a_writer_and_a_read_only_bi_user() -> None:
    import xml.etree.ElementTree as ET

    root = ET.parse(ROOT / "deploy/clickhouse/users.xml").getroot()
    users = root.find("users")
    assert users is not None and {u.tag for u in users} == {"dealpulse", "bi_reader"}
    assert users.findtext("bi_reader/profile") == "readonly"
    assert root.findtext("profiles/readonly/readonly") == "1"
