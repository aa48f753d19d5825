"""deploy/kubernetes: offline schema validation and wiring of the example."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploylib import (
    MANIFESTS,
    by_kind,
    check_podmonitor,
    check_service,
    check_sidecar_pod,
    load_docs,
    one,
    validate_k8s,
)

MANIFEST_FILES = sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def _objects() -> list[dict]:
    return [d for p in MANIFEST_FILES for d in load_docs(p.read_text())]


def test_there_are_manifests() -> None:
    names = {p.name for p in MANIFEST_FILES}
    assert {"deployment.yaml", "configmap.yaml", "secret.yaml", "service.yaml", "podmonitor.yaml"} <= names


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_manifest_validates_offline(path: Path) -> None:
    docs = load_docs(path.read_text())
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        validate_k8s(doc)


def test_kustomization_lists_exactly_the_manifests() -> None:
    k = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    assert sorted(k["resources"]) == [p.name for p in MANIFEST_FILES]
    images = {i["name"] for i in k.get("images", [])}
    used = {
        c["image"].split(":")[0]
        for d in by_kind(_objects(), "Deployment")
        for c in [*(d["spec"]["template"]["spec"].get("initContainers") or []), *d["spec"]["template"]["spec"]["containers"]]
    }
    assert used <= images, f"images without a kustomize override: {used - images}"


def test_orders_runs_txn_sidecar_as_native_sidecar() -> None:
    objs = _objects()
    deployment = one(objs, "Deployment")
    config = check_sidecar_pod(
        deployment,
        by_kind(objs, "ConfigMap"),
        native=True,
        secrets=by_kind(objs, "Secret"),
        expect_sasl_secret=True,
    )
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 45
    assert config["shutdown_grace"] == "20s"
    # SASL is configured in [kafka]; the credentials themselves are not.
    assert config["kafka"]["security.protocol"] == "SASL_SSL"
    assert "sasl.password" not in config["kafka"] and "sasl.username" not in config["kafka"]


def test_every_container_has_requests_and_limits() -> None:
    spec = one(_objects(), "Deployment")["spec"]["template"]["spec"]
    for c in [*spec["initContainers"], *spec["containers"]]:
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) == {"cpu", "memory"}, f"{c['name']} {kind}"


def test_service_and_podmonitor_select_the_pods() -> None:
    objs = _objects()
    deployment = one(objs, "Deployment")
    check_service(one(objs, "Service"), deployment)
    check_podmonitor(one(objs, "PodMonitor"), deployment)
