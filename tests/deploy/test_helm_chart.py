"""helm/txn-sidecar: lint, render with each ci/ values file, validate offline.

Helm runs in-process (helm-python-sdk bundles Helm v4's Go SDK), so these are
the same template engine and values.schema.json validator as `helm install`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

from deploylib import (
    CHART,
    ROOT,
    SASL_ENV,
    SIDECAR,
    by_kind,
    check_podmonitor,
    check_service,
    check_sidecar_pod,
    load_docs,
    one,
    pod_spec,
    validate_k8s,
)

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
BAD_VALUES = sorted((ROOT / "tests" / "deploy" / "bad-values").glob("*.yaml"))
RELEASE, NAMESPACE = "orders", "shop"
LINT_KUBE_VERSION = "v1.33.0"

# Paths (dotted; [] for array items) whose objects are deliberately free-form:
# Kubernetes types passed through as-is, and user maps.
FREE_FORM = {
    "global",
    "app.env", "app.envFrom[]", "app.resources", "app.startupProbe", "app.livenessProbe",
    "app.readinessProbe", "app.securityContext", "app.volumeMounts[]",
    "sidecar.extraEnv[]", "sidecar.extraVolumeMounts[]", "sidecar.config.kafka",
    "sidecar.resources", "sidecar.securityContext",
    "imagePullSecrets[]", "podAnnotations", "podLabels", "podSecurityContext", "volumes[]",
    "nodeSelector", "tolerations[]", "affinity", "podMonitor.labels",
}


def _values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def _render(chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [d for name, text in sorted(out.items()) if name.endswith(".yaml") for d in load_docs(text)]


@pytest.fixture(scope="module")
def renders(chart) -> dict[str, list[dict[str, Any]]]:
    return {p.name: _render(chart, _values(p)) for p in CI_VALUES}


def test_ci_values_files_exist() -> None:
    assert [p.name for p in CI_VALUES] == [
        "defaults-values.yaml",
        "fallback-sidecar-values.yaml",
        "podmonitor-values.yaml",
    ]


def test_chart_metadata(chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "txn-sidecar"
    assert chart.schema is not None, "values.schema.json is shipped"


# ---------------------------------------------------------------- lint


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_lint_strict_is_clean(values_file: Path) -> None:
    report = helm.lint(CHART, _values(values_file), strict=True, kube_version=LINT_KUBE_VERSION)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]


def test_lint_without_values_names_the_required_ones() -> None:
    report = helm.lint(CHART, None, strict=True, kube_version=LINT_KUBE_VERSION)
    text = "\n".join(report["errors"])
    assert "/app/image/repository" in text and "/sidecar/config/topic" in text, text


def _render_for_kube_version(chart, values: dict[str, Any], kube_version: str) -> dict[str, str]:
    # Chart.render (helm-python-sdk 0.2.2) does not expose the cluster version
    # that `.Capabilities.KubeVersion` reports, but the C ABI under it takes
    # `kube_version` in the render options. (helm lint can't be used for
    # this: in lint mode Helm turns `fail` into a log line.)
    from helm_python import _native

    opts = {"name": RELEASE, "namespace": NAMESPACE, "kube_version": kube_version}
    return json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts)))


def test_native_sidecar_refused_before_kubernetes_1_29(chart) -> None:
    native = _values(CHART / "ci" / "defaults-values.yaml")
    with pytest.raises(helm.HelmRenderError, match=r"sidecar.native=true needs Kubernetes >= 1.29"):
        _render_for_kube_version(chart, native, "v1.28.0")
    assert _render_for_kube_version(chart, native, "v1.29.0")
    fallback = _values(CHART / "ci" / "fallback-sidecar-values.yaml")
    rendered = _render_for_kube_version(chart, fallback, "v1.28.0")
    deployment = one(load_docs(rendered["txn-sidecar/templates/deployment.yaml"]), "Deployment")
    assert "initContainers" not in pod_spec(deployment)


# ---------------------------------------------------------------- render + validate


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_render_validates_offline(renders, values_file: Path) -> None:
    docs = renders[values_file.name]
    assert {d["kind"] for d in docs} >= {"Deployment", "ConfigMap", "Service"}
    for doc in docs:
        validate_k8s(doc)


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_recommended_labels(renders, values_file: Path) -> None:
    for doc in renders[values_file.name]:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "txn-sidecar"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["helm.sh/chart"] == "txn-sidecar-0.1.0"


def test_default_render_is_a_native_sidecar(renders) -> None:
    docs = renders["defaults-values.yaml"]
    deployment = one(docs, "Deployment")
    config = check_sidecar_pod(deployment, by_kind(docs, "ConfigMap"), native=True, expect_sasl_secret=False)
    spec = pod_spec(deployment)
    assert [c["name"] for c in spec["initContainers"]] == [SIDECAR]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert spec["initContainers"][0]["image"] == "txn-sidecar:0.1.0"
    assert spec["containers"][0]["image"] == "registry.example.com/orders:1.4.2"
    assert spec["terminationGracePeriodSeconds"] == 45
    assert config == {
        "brokers": "localhost:9092",
        "topic": "orders.tx",
        "group": "orders-txn-sidecar",
        "protocol": "headers",
        "txn_timeout": "5m",
        "on_failure": "dead-letter",
        "shutdown_grace": "20s",
        "log_format": "json",
        "app": {"url": "http://127.0.0.1:8080/transactions"},
        "admin": {"addr": "0.0.0.0:9464"},
        "limits": {"max_staged_bytes": "128MiB"},
        "kafka": {},
    }
    check_service(one(docs, "Service"), deployment)
    assert not by_kind(docs, "PodMonitor")


def test_fallback_render_is_a_regular_container(renders) -> None:
    docs = renders["fallback-sidecar-values.yaml"]
    deployment = one(docs, "Deployment")
    config = check_sidecar_pod(deployment, by_kind(docs, "ConfigMap"), native=False, expect_sasl_secret=True)
    spec = pod_spec(deployment)
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["app", SIDECAR]
    side = spec["containers"][1]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in side["env"] if e["name"] in SASL_ENV}
    assert refs == {
        "TXN_SIDECAR_KAFKA_SASL_USERNAME": {"name": "orders-kafka-credentials", "key": "username"},
        "TXN_SIDECAR_KAFKA_SASL_PASSWORD": {"name": "orders-kafka-credentials", "key": "password"},
    }
    assert config["protocol"] == "key-prefix"
    assert config["on_failure"] == "block"
    assert config["dlq_topic"] == "orders.tx.dead"
    assert config["log_format"] == "text"
    assert config["app"]["url"] == "http://127.0.0.1:8000/transactions"
    # Every [kafka] value is a string, and numbers keep their digits (Helm
    # reads YAML numbers as float64: 1048576 must not become "1.048576e+06").
    assert config["kafka"] == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "ssl.ca.location": "probe",
        "fetch.max.bytes": "1048576",
        "enable.ssl.certificate.verification": "true",
    }
    app_env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
    assert app_env == {"ORDERS_DB_URL": "postgres://orders-db:5432/orders", "WORKERS": "4"}
    assert spec["terminationGracePeriodSeconds"] == 60
    assert not by_kind(docs, "PodMonitor")


def test_podmonitor_only_when_enabled(renders) -> None:
    docs = renders["podmonitor-values.yaml"]
    deployment = one(docs, "Deployment")
    check_sidecar_pod(deployment, by_kind(docs, "ConfigMap"), native=True)
    pm = one(docs, "PodMonitor")
    check_podmonitor(pm, deployment)
    assert pm["spec"]["podMetricsEndpoints"][0]["interval"] == "15s"
    assert pm["spec"]["podMetricsEndpoints"][0]["scrapeTimeout"] == "10s"
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # A digest reference with no tag is used as-is.
    assert pod_spec(deployment)["containers"][0]["image"].startswith("registry.example.com/orders@sha256:")
    for name, docs in renders.items():
        if name != "podmonitor-values.yaml":
            assert not by_kind(docs, "PodMonitor"), name


def test_config_change_rolls_the_pods(chart) -> None:
    base = _values(CHART / "ci" / "defaults-values.yaml")
    changed = json.loads(json.dumps(base))
    changed["sidecar"]["config"]["txnTimeout"] = "10m"

    def checksum(values):
        d = one(_render(chart, values), "Deployment")
        return d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert re.fullmatch(r"[0-9a-f]{64}", checksum(base))
    assert checksum(base) != checksum(changed)


@pytest.mark.parametrize(
    ("grace", "period", "ok"),
    [("20s", 45, True), ("44s", 45, True), ("45s", 45, False), ("1m", 45, False), ("1m 30s", 120, True)],
)
def test_termination_grace_must_exceed_shutdown_grace(chart, grace: str, period: int, ok: bool) -> None:
    values = _values(CHART / "ci" / "defaults-values.yaml")
    values["sidecar"]["config"]["shutdownGrace"] = grace
    values["terminationGracePeriodSeconds"] = period
    if ok:
        assert one(_render(chart, values), "Deployment")
    else:
        with pytest.raises(helm.HelmError, match="must exceed sidecar.config.shutdownGrace"):
            _render(chart, values)


def test_adminaddr_port_drives_container_port_and_probes(chart) -> None:
    values = _values(CHART / "ci" / "defaults-values.yaml")
    values["sidecar"]["config"]["adminAddr"] = "[::]:9500"
    docs = _render(chart, values)
    deployment = one(docs, "Deployment")
    check_sidecar_pod(deployment, by_kind(docs, "ConfigMap"), native=True)
    side = pod_spec(deployment)["initContainers"][0]
    assert side["ports"] == [{"name": "admin", "containerPort": 9500, "protocol": "TCP"}]


def test_service_links_are_off_unless_asked_for(chart) -> None:
    # check_sidecar_pod asserts enableServiceLinks: false for every render above.
    values = _values(CHART / "ci" / "defaults-values.yaml")
    values["enableServiceLinks"] = True
    assert pod_spec(one(_render(chart, values), "Deployment"))["enableServiceLinks"] is True


# ---------------------------------------------------------------- values.schema.json


def _schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def test_schema_is_draft7_and_strict_everywhere() -> None:
    schema = _schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    loose: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" or "properties" in node:
            if path in FREE_FORM:
                assert node.get("additionalProperties") is not False, f"{path} should be free-form"
            elif node.get("additionalProperties") is not False:
                loose.append(path or "<root>")
            for key, sub in node.get("properties", {}).items():
                walk(sub, f"{path}.{key}" if path else key)
        if node.get("type") == "array" and isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "")
    assert not loose, f"objects without additionalProperties: false: {loose}"


def test_schema_and_values_yaml_declare_the_same_keys() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    missing: list[str] = []

    def walk(node: dict[str, Any], values: Any, path: str) -> None:
        if path in FREE_FORM or "properties" not in node:
            return
        for key, sub in node["properties"].items():
            p = f"{path}.{key}" if path else key
            if key == "global":
                continue
            if not isinstance(values, dict) or key not in values:
                missing.append(p)
            else:
                walk(sub, values[key], p)

    walk(_schema(), defaults, "")
    assert not missing, f"in values.schema.json but without a default in values.yaml: {missing}"


def test_schema_enums_match_the_product() -> None:
    config = _schema()["properties"]["sidecar"]["properties"]["config"]["properties"]
    assert config["protocol"]["enum"] == ["headers", "key-prefix"]
    assert config["onFailure"]["enum"] == ["dead-letter", "block"]
    assert config["logFormat"]["enum"] == ["json", "text"]


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_schema_accepts_ci_values(chart, values_file: Path) -> None:
    values = _values(values_file)
    chart.validate_schema(values)
    jsonschema.Draft7Validator(_schema()).validate(chart.merge_values(values))


def test_there_are_bad_values_files() -> None:
    assert len(BAD_VALUES) >= 9


@pytest.mark.parametrize("values_file", BAD_VALUES, ids=lambda p: p.name)
def test_schema_rejects_bad_values(chart, values_file: Path) -> None:
    text = values_file.read_text()
    m = re.search(r"^# expect-error-at: (\S+)$", text, re.M)
    assert m, f"{values_file.name} must say where the schema error is expected"
    expected = m.group(1)
    values = yaml.safe_load(text)

    # Helm itself refuses the values (what `helm install` would do)...
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)

    # ...for the reason the file is about, and for no other.
    merged = chart.merge_values(values)
    errors = list(jsonschema.Draft7Validator(_schema()).iter_errors(merged))
    where = set()
    for e in errors:
        path = ".".join(str(p) for p in e.absolute_path)
        if e.validator == "additionalProperties":
            extra = re.findall(r"'([^']+)' was unexpected", e.message)
            where |= {f"{path}.{x}" if path else x for x in extra}
        else:
            where.add(path)
    assert where == {expected}, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_a_staged_budget_the_memory_limit_cannot_hold_is_refused(chart) -> None:
    # The README's sizing: 1.1 x the budget + 48 MiB of librdkafka buffers + 1.4 x
    # max_txn_bytes + the process must fit the sidecar's memory limit.
    values = _values(CHART / "ci" / "defaults-values.yaml")
    # The product default (192 MiB, 16 MiB transactions) fits the chart's 512Mi.
    values["sidecar"]["config"]["maxStagedBytes"] = ""
    docs = _render(chart, values)
    config = check_sidecar_pod(one(docs, "Deployment"), by_kind(docs, "ConfigMap"), native=True)
    assert "limits" not in config
    # 300 MiB x 1.1 + 6.4 + 48 + 8 x 1.4 x 16 + 15 MiB is over 512 MiB.
    values["sidecar"]["config"]["maxStagedBytes"] = "300MiB"
    docs = _render(chart, values)
    with pytest.raises(AssertionError, match="memory limit 512Mi"):
        check_sidecar_pod(one(docs, "Deployment"), by_kind(docs, "ConfigMap"), native=True)
    values["sidecar"]["resources"] = {"requests": {"cpu": "50m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}
    docs = _render(chart, values)
    config = check_sidecar_pod(one(docs, "Deployment"), by_kind(docs, "ConfigMap"), native=True)
    assert config["limits"]["max_staged_bytes"] == "300MiB"
    # Raising librdkafka's prefetch queue, or the budget through the environment, counts too.
    values["sidecar"]["config"]["maxStagedBytes"] = ""
    values["sidecar"]["config"]["kafka"] = {"queued.max.messages.kbytes": "1048576"}
    with pytest.raises(AssertionError, match="memory limit 1Gi"):
        check_sidecar_pod(one(_render(chart, values), "Deployment"), by_kind(_render(chart, values), "ConfigMap"), native=True)
    values["sidecar"]["config"]["kafka"] = {}
    values["sidecar"]["extraEnv"] = [{"name": "TXN_SIDECAR_LIMITS_MAX_STAGED_BYTES", "value": "2GiB"}]
    with pytest.raises(AssertionError, match="memory limit 1Gi"):
        check_sidecar_pod(one(_render(chart, values), "Deployment"), by_kind(_render(chart, values), "ConfigMap"), native=True)


def test_secret_references_pass_through_verbatim(chart) -> None:
    # ${env:...} / ${file:...} are resolved by txn-sidecar at start, not by Helm.
    values = _values(CHART / "ci" / "defaults-values.yaml")
    values["sidecar"]["config"]["kafka"] = {
        "sasl.username": "${env:KAFKA_USER}",
        "sasl.password": "${file:/etc/txn-sidecar/secret/password}",
    }
    docs = _render(chart, values)
    config = check_sidecar_pod(one(docs, "Deployment"), by_kind(docs, "ConfigMap"), native=True)
    assert config["kafka"] == values["sidecar"]["config"]["kafka"]
