"""Static checks of the deployment assets: compose, Dockerfile, Prometheus rules, Grafana.

No network and no Docker engine: the files are parsed and cross-checked against
each other and against the metrics the bridge really registers.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bridge.metrics import PREFIX, Metrics

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
PROMETHEUS_DIR = REPO / "prometheus"
DASHBOARD = REPO / "grafana" / "dashboards" / "orangepill-bridge.json"
DATASOURCES = REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = REPO / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"

# The settings the bridge reads from the environment (DESIGN.md, "Settings"),
# used only when bridge.config does not export its own list.
DOCUMENTED_ENV_VARS = frozenset(
    {
        "ORANGEPILL_STREAM_URL",
        "ORANGEPILL_REALM_KEY",
        "BRIDGE_AMQP_URL",
        "BRIDGE_EXCHANGE",
        "BRIDGE_SPOOL",
        "BRIDGE_METRICS_ADDR",
        "BRIDGE_PING_INTERVAL",
        "BRIDGE_CONFIG",
        "BRIDGE_LOG_FORMAT",
        "BRIDGE_LOG_LEVEL",
    }
)
BRIDGE_SERVICES = ("bridge", "simulator")
METRIC_RE = re.compile(rf"\b{PREFIX}_[a-zA-Z0-9_:]+")
TEMPLATE_VAR_RE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
# Variables Grafana defines itself; tests/test_prometheus.py substitutes them.
GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s"})
SEVERITIES = frozenset({"critical", "warning", "info"})


# ── loading ──────────────────────────────────────────────────────────────────


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return load_yaml(PROMETHEUS_DIR / "prometheus.yml")


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    return alert_rules(load_yaml(PROMETHEUS_DIR / "alerts.yml"))


def alert_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every alerting rule of a rules file, across groups."""
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-row panel, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def dashboard_queries(dash: dict[str, Any]) -> list[str]:
    """Every PromQL text in the dashboard: panel targets and template variable queries."""
    exprs = [t["expr"] for panel in dashboard_panels(dash) for t in panel.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def exported_series() -> tuple[set[str], set[str]]:
    """Series names a fresh Metrics registry can expose: (all of them, the primary one per family).

    Labelled gauges with no child yet expose no sample, so names are derived
    from each family's type as well as read off the samples.
    """
    text = generate_latest(Metrics(CollectorRegistry()).registry).decode()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    primary_suffix = {"counter": "_total", "histogram": "_bucket", "info": "_info"}
    every: set[str] = set()
    primary: set[str] = set()
    for family in text_string_to_metric_families(text):
        every.update(sample.name for sample in family.samples)
        every.update(family.name + s for s in suffixes.get(family.type, ("",)))
        if not family.name.endswith("_created"):
            primary.add(family.name + primary_suffix.get(family.type, ""))
    return every, primary


def bridge_env_vars() -> frozenset[str]:
    """The environment variables the bridge reads: bridge.config's list once it exists."""
    try:
        from bridge.config import ENV_VARS  # type: ignore[attr-defined]
    except ImportError:
        return DOCUMENTED_ENV_VARS
    names = ENV_VARS.values() if isinstance(ENV_VARS, dict) else ENV_VARS
    return frozenset(str(n) for n in names)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def split_mount(volume: str | dict[str, Any]) -> tuple[str, str]:
    """Return (source, target) of a short- or long-syntax compose volume."""
    if isinstance(volume, dict):
        return str(volume.get("source", "")), str(volume["target"])
    parts = volume.split(":")
    return parts[0], parts[1]


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def container_port(mapping: str | int | dict[str, Any]) -> int:
    if isinstance(mapping, dict):
        return int(mapping["target"])
    return int(str(mapping).split(":")[-1].split("/")[0])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def metrics_port(compose: dict[str, Any]) -> int:
    addr = service_env(compose["services"]["bridge"])["BRIDGE_METRICS_ADDR"]
    return int(addr.rsplit(":", 1)[1])


def scrape_targets(config: dict[str, Any], job: str) -> list[str]:
    (scrape,) = [s for s in config["scrape_configs"] if s["job_name"] == job]
    return [t for sc in scrape["static_configs"] for t in sc["targets"]]


# ── docker compose ───────────────────────────────────────────────────────────


def test_compose_defines_the_whole_stack(compose: dict[str, Any]) -> None:
    """The compose file has the five services of the issue, RabbitMQ with its AMQP and UI ports."""
    services = compose["services"]
    assert {"rabbitmq", "simulator", "bridge", "prometheus", "grafana"} <= services.keys()
    assert re.fullmatch(r"rabbitmq:3\.\d+\.\d+-management", services["rabbitmq"]["image"])
    assert {container_port(p) for p in services["rabbitmq"]["ports"]} >= {5672, 15672}
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_bridge_and_simulator_are_built_from_the_dockerfile(compose: dict[str, Any]) -> None:
    """Both bridge and simulator build the repository's Dockerfile and run its sub-commands."""
    for name in BRIDGE_SERVICES:
        build = compose["services"][name]["build"]
        context = REPO / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (context / dockerfile).resolve() == DOCKERFILE, name
    assert compose["services"]["bridge"]["command"] == ["run"]
    simulate = compose["services"]["simulator"]["command"]
    simulate = shlex.split(simulate) if isinstance(simulate, str) else simulate
    assert simulate[0] == "simulate"
    assert simulate[simulate.index("--host") + 1] == "0.0.0.0"


def test_compose_env_vars_are_ones_the_bridge_reads(compose: dict[str, Any]) -> None:
    """Every environment variable given to the bridge's containers is a setting the bridge reads."""
    known = bridge_env_vars()
    for name in BRIDGE_SERVICES:
        unknown = set(service_env(compose["services"][name])) - known
        assert not unknown, f"{name} sets variables the bridge does not read: {sorted(unknown)}"


def test_bridge_defaults_point_at_the_simulator_and_can_be_overridden(compose: dict[str, Any]) -> None:
    """The stream URL defaults to the simulator's; bridge and simulator read one realm-key secret."""
    services = compose["services"]
    env = service_env(services["bridge"])
    simulate = services["simulator"]["command"]
    port = simulate[simulate.index("--port") + 1]
    assert env["ORANGEPILL_STREAM_URL"] == f"${{ORANGEPILL_STREAM_URL:-ws://simulator:{port}}}"
    for name in BRIDGE_SERVICES:
        assert service_env(services[name])["ORANGEPILL_REALM_KEY_FILE"] == "/run/secrets/realm_key", name
        assert "realm_key" in services[name]["secrets"], name
        assert "--realm-key" not in services[name]["command"], f"{name}: a key on the command line"
    # Nothing may require the simulator, so that --scale simulator=0 switches it off.
    for name, service in compose["services"].items():
        assert "simulator" not in (service.get("depends_on") or {}), name


def test_secrets_are_files_never_inline(compose: dict[str, Any]) -> None:
    """Realm key, AMQP URL and Grafana password are Docker secrets; no credential is written in the file."""
    declared = compose["secrets"]
    assert {"realm_key", "amqp_url", "grafana_admin_password"} <= declared.keys()
    for secret in declared.values():
        assert str(secret["file"]).startswith("./secrets/"), secret
    bridge = service_env(compose["services"]["bridge"])
    assert bridge["BRIDGE_AMQP_URL_FILE"] == "/run/secrets/amqp_url"
    for name, service in compose["services"].items():
        for var, value in service_env(service).items():
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), f"{name}: {var} has inline credentials"
            if re.search(r"PASSWORD|PASS$|SECRET|REALM_KEY$", var):
                assert var.endswith("_FILE") or value.startswith("/run/secrets/"), f"{name}: {var} is inline"
    text = COMPOSE.read_text(encoding="utf-8")
    assert "guest:guest" not in text
    assert "demo-realm-key" not in text


def test_published_ports_are_bound_to_loopback_by_default(compose: dict[str, Any]) -> None:
    """Every published port names its host address, which defaults to 127.0.0.1 (BIND_ADDR overrides it)."""
    published = [p for service in compose["services"].values() for p in service.get("ports", [])]
    assert published
    for port in published:
        assert str(port).startswith("${BIND_ADDR:-127.0.0.1}:"), port


def test_grafana_and_prometheus_admin_surfaces_are_closed(compose: dict[str, Any]) -> None:
    """Grafana has no anonymous access and a file-based admin password; Prometheus has no lifecycle API."""
    grafana = service_env(compose["services"]["grafana"])
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")
    assert not any("lifecycle" in arg for arg in compose["services"]["prometheus"]["command"])


def test_compose_secrets_script_writes_every_secret_file(compose: dict[str, Any], tmp_path: Path) -> None:
    """`make compose-secrets` writes each file compose needs, private, and keeps a key already written."""
    for name in ("deploy", ".env.example"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name)
        else:
            shutil.copy(source, tmp_path / name)
    (tmp_path / "secrets").mkdir(mode=0o700)
    (tmp_path / "secrets" / "realm_key").write_text("my-own-realm-key-0123456789")
    subprocess.run(["bash", str(tmp_path / "deploy" / "compose-secrets.sh")], check=True, capture_output=True)
    assert (tmp_path / "secrets" / "realm_key").read_text() == "my-own-realm-key-0123456789"
    needed = [str(s["file"]) for s in compose["secrets"].values()]
    needed += [
        split_mount(v)[0]
        for service in compose["services"].values()
        for v in service.get("volumes", [])
        if split_mount(v)[0].startswith("./secrets/")
    ]
    for path in needed:
        assert (tmp_path / path).stat().st_size > 0, path
    password = re.search(r"default_pass = (\S+)", (tmp_path / "secrets" / "rabbitmq.conf").read_text())
    assert password and len(password.group(1)) >= 24
    assert f":{password.group(1)}@" in (tmp_path / "secrets" / "amqp_url").read_text()
    assert (tmp_path / ".env").exists()
    assert (tmp_path / "secrets").stat().st_mode & 0o077 == 0
    assert {".env", "secrets/"} <= set((REPO / ".gitignore").read_text().split())


def test_compose_bind_mounts_exist_in_the_repository(compose: dict[str, Any]) -> None:
    """Every host path that compose mounts exists (secrets/ comes from `make compose-secrets`)."""
    mounts = [
        split_mount(v)[0]
        for service in compose["services"].values()
        for v in service.get("volumes", [])
        if is_bind(split_mount(v)[0]) and not split_mount(v)[0].startswith("./secrets/")
    ]
    assert mounts, "expected bind mounts for prometheus/ and grafana/"
    for source in mounts:
        assert (REPO / source).exists(), source


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    """Every named volume a service mounts is declared at the top level."""
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for v in service.get("volumes", []):
            source, _ = split_mount(v)
            if not is_bind(source):
                assert source in declared, f"{name}: volume {source} is not declared"


def test_spool_lives_on_a_named_volume(compose: dict[str, Any]) -> None:
    """The bridge's spool file is inside a named volume, so it survives a container rebuild."""
    bridge = compose["services"]["bridge"]
    spool = PurePosixPath(service_env(bridge)["BRIDGE_SPOOL"])
    named_targets = [
        PurePosixPath(target)
        for source, target in map(split_mount, bridge.get("volumes", []))
        if not is_bind(source)
    ]
    assert any(t in spool.parents for t in named_targets), (spool, named_targets)


def test_bridge_health_and_start_order(compose: dict[str, Any]) -> None:
    """The bridge waits for a healthy RabbitMQ and is health-checked on /healthz of its metrics port."""
    services = compose["services"]
    bridge = services["bridge"]
    assert bridge["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert "healthcheck" in services["rabbitmq"]
    check = " ".join(bridge["healthcheck"]["test"])
    assert f":{metrics_port(compose)}/healthz" in check


def test_metrics_port_is_the_same_everywhere(
    compose: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    """BRIDGE_METRICS_ADDR, the published port, EXPOSE and the Prometheus target agree on one port."""
    port = metrics_port(compose)
    exposed = {
        int(p.split("/")[0]) for i, args in dockerfile_instructions() if i == "EXPOSE" for p in args.split()
    }
    assert port in exposed
    assert port in {container_port(p) for p in compose["services"]["bridge"]["ports"]}
    assert scrape_targets(prometheus_config, "orangepill-bridge") == [f"bridge:{port}"]


def test_dockerfile_runs_the_console_script_as_non_root() -> None:
    """The image is a pinned python:3.11 slim release, installs the package, runs as non-root via the console script."""
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", instructions[0][1])
    users = [args for i, args in instructions if i == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1] not in {"root", "0"}
    assert any(i == "RUN" and "pip install ." in args for i, args in instructions)
    assert ("ENTRYPOINT", '["orangepill-bridge"]') in instructions


def test_dockerfile_copies_only_files_that_exist() -> None:
    """Every COPY source of the Dockerfile exists in the repository and is not excluded by .dockerignore."""
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    copies = [args.split()[:-1] for i, args in dockerfile_instructions() if i == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: missing from the repository"
            assert source not in ignored, f"COPY {source}: excluded by .dockerignore"


def test_compose_config_is_valid() -> None:
    """`docker compose config -q` (or docker-compose) accepts the file, where a compose client exists."""
    docker = shutil.which("docker")
    candidates = [[docker, "compose"]] if docker else []
    if legacy := shutil.which("docker-compose"):
        candidates.append([legacy])
    for cmd in candidates:
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30, check=False)
        if probe.returncode != 0:
            continue
        result = subprocess.run(
            [*cmd, "-f", str(COMPOSE), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return
    pytest.skip("no compose client here (neither `docker compose` nor `docker-compose` runs)")


# ── Prometheus ───────────────────────────────────────────────────────────────


def test_prometheus_config_loads_the_mounted_rules(
    compose: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    """Prometheus's rule_files resolve inside the mounted prometheus/ folder, where alerts.yml is."""
    prometheus = compose["services"]["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus["command"] if "=" in arg)
    config_dir = PurePosixPath(flags["--config.file"]).parent
    mounts = {PurePosixPath(t): s for s, t in map(split_mount, prometheus["volumes"])}
    assert (REPO / mounts[config_dir]).resolve() == PROMETHEUS_DIR
    for rule_file in prometheus_config["rule_files"]:
        path = PurePosixPath(rule_file)
        relative = path.relative_to(config_dir) if path.is_absolute() else path
        assert (PROMETHEUS_DIR / relative).is_file(), rule_file
    assert "alerts.yml" in {PurePosixPath(r).name for r in prometheus_config["rule_files"]}


def test_every_alert_is_actionable(rules: list[dict[str, Any]]) -> None:
    """Every alert has a for: duration, a known severity, and a summary and description worth reading."""
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: for: missing"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert len(annotations.get("summary", "")) >= 20, f"{name}: summary"
        assert len(annotations.get("description", "")) >= 80, f"{name}: description"


def test_alerts_cover_the_failure_modes_of_the_issue(rules: list[dict[str, Any]]) -> None:
    """Each failure mode the issue lists has an alert on the metric that shows it."""
    needed = {
        "stream disconnected": "orangepill_bridge_stream_connected",
        "realm not subscribed": "orangepill_bridge_subscribed",
        "no events": "orangepill_bridge_last_event_timestamp_seconds",
        "spool backlog": "orangepill_bridge_spool_depth",
        "spool full": "orangepill_bridge_spool_full",
        "publish failures": "orangepill_bridge_publish_failures_total",
        "broker down": "orangepill_bridge_amqp_connected",
        "quarantined frames": "orangepill_bridge_events_rejected_total",
    }
    used = {m for rule in rules for m in METRIC_RE.findall(rule["expr"])}
    missing = {mode for mode, metric in needed.items() if metric not in used}
    assert not missing


def test_alert_metric_names_exist(rules: list[dict[str, Any]]) -> None:
    """Every bridge metric an alert expression names is one the bridge exposes."""
    every, _ = exported_series()
    for rule in rules:
        unknown = set(METRIC_RE.findall(rule["expr"])) - every
        assert not unknown, f"{rule['alert']}: {sorted(unknown)}"


def test_up_alert_watches_the_scrape_job(
    rules: list[dict[str, Any]], prometheus_config: dict[str, Any]
) -> None:
    """An alert on up{job=…} names the job prometheus.yml scrapes the bridge under."""
    jobs = {s["job_name"] for s in prometheus_config["scrape_configs"]}
    up_jobs = {m for r in rules for m in re.findall(r'\bup\{job="([^"]+)"\}', r["expr"])}
    assert up_jobs, "expected an alert on the bridge's scrape target being down"
    assert up_jobs <= jobs


# ── Grafana ──────────────────────────────────────────────────────────────────


def test_dashboard_metric_names_exist(dashboard: dict[str, Any]) -> None:
    """Every bridge metric a panel or variable query names is one the bridge exposes."""
    every, _ = exported_series()
    used = {m for expr in dashboard_queries(dashboard) for m in METRIC_RE.findall(expr)}
    assert used
    assert not used - every, sorted(used - every)


def test_every_exported_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    """Each metric family the bridge registers is shown by at least one panel."""
    _, primary = exported_series()
    used = {m for expr in dashboard_queries(dashboard) for m in METRIC_RE.findall(expr)}
    assert not primary - used, sorted(primary - used)


def test_every_panel_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    """Panels, their queries and the template variables all name the provisioned datasource uid."""
    (source,) = load_yaml(DATASOURCES)["datasources"]
    uid = source["uid"]
    assert source["type"] == "prometheus"
    refs = []
    for panel in dashboard_panels(dashboard):
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        refs.append(panel["datasource"])
        refs.extend(t["datasource"] for t in panel["targets"])
    refs.extend(v["datasource"] for v in dashboard["templating"]["list"] if v["type"] == "query")
    assert {(r["type"], r["uid"]) for r in refs} == {("prometheus", uid)}


def test_dashboard_variables_are_defined(dashboard: dict[str, Any]) -> None:
    """Every $variable a query uses is a template variable of the dashboard or a Grafana built-in."""
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert "instance" in defined
    for expr in dashboard_queries(dashboard):
        for braced, bare in TEMPLATE_VAR_RE.findall(expr):
            assert (braced or bare) in defined | GRAFANA_BUILTINS, expr


def test_dashboard_layout_is_sound(dashboard: dict[str, Any]) -> None:
    """Panel ids are unique, every panel fits the 24-column grid, and the uid is fixed."""
    panels = dashboard["panels"] + [p for row in dashboard["panels"] for p in row.get("panels", [])]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0, p["title"]
        assert 0 < grid["w"] <= 24 - grid["x"], p["title"]
    assert dashboard["uid"] == "orangepill-bridge"
    assert dashboard["schemaVersion"] >= 36  # Grafana 9.x and later; 10 and 11 migrate it on load


def test_grafana_provisioning_matches_compose(compose: dict[str, Any]) -> None:
    """Grafana loads dashboards from the folder compose mounts and reaches the prometheus service."""
    grafana = compose["services"]["grafana"]
    mounts = {(REPO / s).resolve(): t for s, t in map(split_mount, grafana["volumes"]) if is_bind(s)}
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert mounts[DASHBOARD.parent] == provider["options"]["path"]
    assert mounts[REPO / "grafana" / "provisioning"] == "/etc/grafana/provisioning"
    (source,) = load_yaml(DATASOURCES)["datasources"]
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus"
    assert url.port in {container_port(p) for p in compose["services"]["prometheus"]["ports"]}
