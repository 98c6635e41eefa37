"""The monitoring configuration under deploy/, docker-compose.yml and the
Dockerfile.

promtool checks and unit-tests the alert rules, docker-compose validates the
stack, and every metric a dashboard or a rule queries must be one aura-pg
exports (aura_pg.observability.names), so that a renamed metric cannot leave
a panel or an alert silently empty. The parsed compose file and Dockerfile
are checked for what a first start needs (issue 23): a database healthcheck
over TCP, migrate retried, daemons checked on /health, one image, the NATS
stream created, a non-root image with a HEALTHCHECK and a pinned base.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aura_pg.observability import names

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yaml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yaml"
GRAFANA_DIR = DEPLOY / "grafana"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "aura.yaml"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"

# Histograms also expose <name>_bucket, <name>_sum and <name>_count.
HISTOGRAMS = frozenset(
    {
        names.EVENT_PROCESSING_DURATION,
        names.EVENT_END_TO_END,
        names.PROJECTION_BATCH_DURATION,
        names.APPEND_DURATION,
        names.OUTBOX_PUBLISH_DURATION,
    }
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Series Prometheus makes itself for every target.
PROMETHEUS_OWN = frozenset({"up"})


# --- external tools ---------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed (not on PATH): run scripts/install-system.sh, "
            "which installs it (CI does)"
        )
    return path


def _run(*args: str | Path, cwd: Path = REPO_ROOT) -> str:
    argv = [str(arg) for arg in args]
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    output = f"$ {' '.join(argv)}\n{result.stdout}{result.stderr}"
    assert result.returncode == 0, f"exit status {result.returncode}\n{output}"
    return output


def test_promtool_check_rules() -> None:
    _run(_tool("promtool"), "check", "rules", ALERTS)


def test_promtool_check_config() -> None:
    # rule_files are relative to the config file, so this checks alerts.yaml too.
    _run(_tool("promtool"), "check", "config", PROMETHEUS_CONFIG)


def test_promtool_rule_unit_tests() -> None:
    output = _run(_tool("promtool"), "test", "rules", ALERTS_TEST.name, cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in output, output


def test_docker_compose_config() -> None:
    _run(_tool("docker-compose"), "--file", COMPOSE_FILE, "config", "--quiet")


# --- alert rules ------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _alert_rules() -> list[dict[str, Any]]:
    groups = _load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_alert_rules_have_severity_and_annotations() -> None:
    rules = _alert_rules()
    assert rules
    duplicates = [name for name, n in Counter(r["alert"] for r in rules).items() if n > 1]
    assert not duplicates
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    config = _load_yaml(ALERTS_TEST)
    assert config["rule_files"] == [ALERTS.name]
    for group in config["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert alerts - firing == set(), "alerts without a test case where they fire"
    assert alerts - quiet == set(), "alerts without a test case where they do not fire"
    assert (firing | quiet) - alerts == set(), "test cases for alerts that do not exist"


# --- PromQL metric names ----------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*["'`]([A-Za-z_:][\w:]*)["'`]""")
_COMMENT = re.compile(r"#[^\n]*")
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|\w+)")
# An identifier that is a whole token (not part of a number such as 1e3 or a
# duration such as 10m, not a $variable) and not a function call.
_IDENTIFIER = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*(?![\w:])(?!\s*\()")
# Aggregation operators (followed by `by (...)` rather than by a parenthesis),
# binary and modifier keywords, and literals.
_PROMQL_WORDS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
        "atan2",
        "inf",
        "nan",
        "start",
        "end",
    }
)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects."""
    found = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub('""', expr)
    text = _COMMENT.sub(" ", text)
    text = _BRACES.sub("{}", text)
    # Nested subqueries, e.g. max_over_time(rate(x[5m])[1h:1m]).
    while _BRACKETS.search(text):
        text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    found.update(word for word in _IDENTIFIER.findall(text) if word.lower() not in _PROMQL_WORDS)
    return found


def is_exported(name: str) -> bool:
    if name in names.EXPORTED_METRIC_NAMES or name in PROMETHEUS_OWN:
        return True
    return any(
        name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS
        for suffix in HISTOGRAM_SUFFIXES
    )


def unknown_metrics(exprs: dict[str, str]) -> dict[str, set[str]]:
    """{where: names not exported} for the expressions given by location."""
    unknown = {
        where: {n for n in metric_names(expr) if not is_exported(n)}
        for where, expr in exprs.items()
    }
    return {where: found for where, found in unknown.items() if found}


def test_metric_names_extractor() -> None:
    cases = {
        "sum(rate(aura_nonexistent_metric[5m]))": {"aura_nonexistent_metric"},
        (
            "histogram_quantile(0.95, sum by (le, projection_name) (rate("
            'aura_event_end_to_end_seconds_bucket{projection_name=~"$projection_name"}'
            "[$__rate_interval])))"
        ): {"aura_event_end_to_end_seconds_bucket"},
        'max by (job) (up{job="aura-projector"}) == 0 or absent(up{job="aura-projector"})': {"up"},
        "max by (p) (a_gauge) > max by (p) (b_gauge offset 10m)": {"a_gauge", "b_gauge"},
        "foo / on (instance) group_left (version) bar_info": {"foo", "bar_info"},
        "sum without (instance) (x_total) > bool 1e3 unless y": {"x_total", "y"},
        'label_replace(x_metric, "dst", "$1", "src", "(.*)")': {"x_metric"},
        "max_over_time(rate(c_total[5m])[1h:1m]) @ end()": {"c_total"},
        "1 - recorded:rule:ratio5m>0.5": {"recorded:rule:ratio5m"},
        'count({__name__="by_name_only", le="+Inf"}) and Inf > NaN': {"by_name_only"},
        "topk(5, sum by (event_type) (rate(z_total[$__interval])))": {"z_total"},
        "vector(1) + time() + scalar(w) # a comment naming not_a_metric": {"w"},
    }
    for expr, expected in cases.items():
        assert metric_names(expr) == expected, expr


def test_unknown_metric_is_reported() -> None:
    fake = {
        "uid": "fake",
        "panels": [
            {
                "id": 1,
                "type": "timeseries",
                "datasource": {"type": "prometheus", "uid": "x"},
                "targets": [
                    {"refId": "A", "expr": "sum(rate(aura_nonexistent_metric[5m]))"},
                    # _bucket only on histograms.
                    {"refId": "B", "expr": "rate(aura_events_processed_total_bucket[5m])"},
                    {"refId": "C", "expr": "rate(aura_append_duration_seconds_count[5m])"},
                    {"refId": "D", "expr": 'max(aura_database_up{job="aura-relay"})'},
                ],
            }
        ],
    }
    unknown = unknown_metrics(dict(_dashboard_exprs(fake)))
    assert set().union(*unknown.values()) == {
        "aura_nonexistent_metric",
        "aura_events_processed_total_bucket",
    }


def test_histograms_are_exported_names() -> None:
    assert names.EXPORTED_METRIC_NAMES >= HISTOGRAMS


# --- Grafana ----------------------------------------------------------------


def _prometheus_datasource_uid() -> str:
    (source,) = [s for s in _load_yaml(DATASOURCES)["datasources"] if s["type"] == "prometheus"]
    assert source["url"] == "http://prometheus:9090"
    return str(source["uid"])


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        # Collapsed rows hold their panels.
        yield from _panels(panel.get("panels", []))


def _variable_expr(query: Any) -> str | None:
    """The PromQL inside a Prometheus template variable query, if any."""
    if isinstance(query, dict):
        query = query.get("query", "")
    query = str(query).strip()
    match = re.fullmatch(r"label_values\((.*),\s*\w+\s*\)", query)
    if match:
        return match.group(1)
    match = re.fullmatch(r"query_result\((.*)\)", query)
    if match:
        return match.group(1)
    return None


def _dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    uid = dashboard["uid"]
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            yield f"{uid} panel {panel['id']} target {target['refId']}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            expr = _variable_expr(variable["query"])
            assert expr is not None, f"{uid} variable {variable['name']}: unknown query form"
            yield f"{uid} variable {variable['name']}", expr


def _load_dashboard(path: Path) -> dict[str, Any]:
    dashboard = json.loads(path.read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def test_dashboards_exist() -> None:
    assert {path.name for path in DASHBOARDS} >= {"system-overview.json"}
    uids = [_load_dashboard(path)["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = _load_dashboard(path)
    datasource_uid = _prometheus_datasource_uid()
    assert dashboard["title"]
    assert dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for panel in panels:
        where = f"{path.name} panel {panel['id']} ({panel.get('title')})"
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), where
        if panel["type"] == "row":
            assert not panel.get("targets"), where
            continue
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table"}, where
        assert panel["datasource"]["uid"] == datasource_uid, where
        targets = panel["targets"]
        assert targets, where
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in targets:
            assert target.get("expr", "").strip(), f"{where} target {target['refId']}: no expr"
            if "datasource" in target:
                assert target["datasource"]["uid"] == datasource_uid, where
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            assert variable["datasource"]["uid"] == datasource_uid, variable["name"]


def _all_exprs() -> dict[str, str]:
    exprs = {f"alert {rule['alert']}": rule["expr"] for rule in _alert_rules()}
    for path in DASHBOARDS:
        exprs.update(_dashboard_exprs(_load_dashboard(path)))
    return exprs


def test_dashboards_and_rules_query_only_exported_metrics() -> None:
    exprs = _all_exprs()
    for where, expr in exprs.items():
        assert metric_names(expr), f"{where}: no metric found in {expr!r}"
    unknown = unknown_metrics(exprs)
    assert not unknown, "\n".join(
        f"{where}: {sorted(found)} not in aura_pg.observability.names"
        for where, found in unknown.items()
    )


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana variables substituted)."""
    substitutions = {
        "$__rate_interval": "1m",
        "$__interval": "1m",
        "$__range": "1h",
    }
    rules = []
    for i, (where, expr) in enumerate(_all_exprs().items()):
        if where.startswith("alert "):
            continue
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        expr = _VARIABLE.sub(".*", expr)
        # The rule name says where the query is when promtool rejects it.
        rules.append({"record": f"q{i}:" + re.sub(r"\W", "_", where), "expr": expr})
    assert rules
    rule_file = tmp_path / "dashboard_queries.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    _run(_tool("promtool"), "check", "rules", rule_file)


# --- wiring between the files -----------------------------------------------


def test_compose_mounts_match_the_configuration() -> None:
    services = _load_yaml(COMPOSE_FILE)["services"]
    assert {"prometheus", "grafana", "otel-collector", "jaeger"} <= services.keys()

    def mounts(service: str) -> dict[str, str]:
        pairs = (volume.split(":")[:2] for volume in services[service]["volumes"])
        return {source: target for source, target in pairs}

    assert mounts("prometheus")["./deploy/prometheus"] == "/etc/prometheus"
    grafana = mounts("grafana")
    assert grafana["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = _load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert grafana["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert "./deploy/otel-collector.yaml" in mounts("otel-collector")

    scrape = {job["job_name"]: job for job in _load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    (projector_sd,) = scrape["aura-projector"]["dns_sd_configs"]
    assert projector_sd["names"] == ["projector"]
    (relay_static,) = scrape["aura-relay"]["static_configs"]
    assert relay_static["targets"] == ["relay:9188"]
    for service, port in (("projector", projector_sd["port"]), ("relay", 9188)):
        command = services[service]["command"]
        assert command[command.index("--metrics-port") + 1] == str(port), service
        environment = services[service]["environment"]
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
        assert environment["OTEL_SERVICE_NAME"]


# --- a stack that starts cleanly (issue 23) ---------------------------------

DOCKERFILE = REPO_ROOT / "Dockerfile"
OUTBOX_DOC = REPO_ROOT / "docs" / "outbox.md"
CREATE_STREAM = DEPLOY / "nats" / "create_stream.py"
# The services that run the aura-pg image, and the daemons among them with
# their metrics port.
AURA_PG_SERVICES = ("migrate", "projector", "nats-stream", "relay", "aura-pg")
DAEMON_PORTS = {"projector": 9187, "relay": 9188}


def _services() -> dict[str, Any]:
    services: dict[str, Any] = _load_yaml(COMPOSE_FILE)["services"]
    return services


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_compose_database_is_healthy_only_when_it_answers_over_tcp() -> None:
    """The image's init-time server listens on the Unix socket only: a
    pg_isready without -h reports it ready before the real server is."""
    check = _services()["postgres"]["healthcheck"]
    test = check["test"]
    assert test[0] == "CMD"
    assert test[1] == "pg_isready"
    assert test[test.index("-h") + 1] == "127.0.0.1"
    assert _seconds(check["start_period"]) >= 30


def test_compose_builds_one_image_and_shares_it_by_name() -> None:
    services = _services()
    built = {name for name, service in services.items() if "build" in service}
    assert built == {"migrate"}
    image = services["migrate"]["image"]
    for name in AURA_PG_SERVICES:
        assert services[name]["image"] == image, name
        if name != "migrate":
            # Never pulled: the image is the one migrate builds.
            assert services[name]["pull_policy"] == "never", name


def test_compose_migrate_restarts_until_it_succeeds_and_the_daemons_wait_for_it() -> None:
    services = _services()
    assert services["migrate"]["restart"] == "on-failure"
    for name in DAEMON_PORTS:
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
        assert services[name]["restart"] == "unless-stopped"


def test_compose_daemons_are_checked_on_their_health_endpoint() -> None:
    services = _services()
    for name, port in DAEMON_PORTS.items():
        command = services[name]["command"]
        assert command[command.index("--metrics-port") + 1] == str(port), name
        check = services[name]["healthcheck"]
        assert check["test"][0] == "CMD", name
        assert f"http://127.0.0.1:{port}/health" in " ".join(check["test"]), name
        assert _seconds(check["start_period"]) > 0, name
    for name in ("migrate", "nats-stream", "aura-pg"):  # one-shot: no endpoint
        assert services[name]["healthcheck"] == {"disable": True}, name


def test_compose_creates_the_stream_the_relay_publishes_to() -> None:
    services = _services()
    job = services["nats-stream"]
    assert job["entrypoint"] == ["python", "/deploy/nats/create_stream.py"]
    assert "./deploy/nats:/deploy/nats:ro" in job["volumes"]
    assert job["restart"] == "on-failure"
    args = job["command"]
    relay = services["relay"]
    relay_server = relay["command"][relay["command"].index("--nats-server") + 1]
    assert args[args.index("--server") + 1] == relay_server
    assert relay["depends_on"]["nats-stream"] == {"condition": "service_completed_successfully"}
    # The stream of docs/outbox.md (`nats stream add AURA --subjects 'aura.>' ...`).
    match = re.search(r"nats stream add (\S+) --subjects '([^']+)'", OUTBOX_DOC.read_text())
    assert match, "docs/outbox.md no longer shows the stream"
    assert args[args.index("--stream") + 1] == match.group(1)
    assert args[args.index("--subjects") + 1 :] == [match.group(2)]
    assert CREATE_STREAM.is_file()


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_pins_the_base_image() -> None:
    (base,) = [args for instruction, args in _dockerfile() if instruction == "FROM"]
    name, _, tag = base.partition("@")[0].partition(":")
    assert name == "python"
    # An exact Python release (x.y.z) on a named Debian release, or a digest.
    assert re.fullmatch(r"\d+\.\d+\.\d+-slim-[a-z]+", tag) or "@sha256:" in base, base


def test_dockerfile_runs_as_a_non_root_user_and_checks_health() -> None:
    instructions = _dockerfile()
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    (check,) = [args for instruction, args in instructions if instruction == "HEALTHCHECK"]
    assert "/health" in check
    assert "AURA_PG_METRICS_PORT" in check
    # USER comes after the installation (which needs root) and before the entrypoint.
    order = [instruction for instruction, _ in instructions]
    assert order.index("RUN") < len(order) - 1 - order[::-1].index("USER")
    assert order[-1] == "ENTRYPOINT"


def test_dockerfile_installs_the_sinks_the_stack_uses() -> None:
    runs = " ".join(args for instruction, args in _dockerfile() if instruction == "RUN")
    match = re.search(r'pip install "\.\[([^\]]*)\]"', runs)
    assert match, runs
    assert {"binary", "nats", "webhook"} <= set(match.group(1).split(","))
