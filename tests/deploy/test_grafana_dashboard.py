"""deploy/grafana/txn-sidecar-dashboard.json against the product's metric contract.

tests/deploy/metric_names.txt is the contract's list of metric base names
(one per line; histograms export _bucket, _sum and _count). The Rust side
checks that the process exports each of them; this side checks that the
dashboard asks for nothing else and uses every one.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import pytest

from deploylib import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "txn-sidecar-dashboard.json"
NAMES_FILE = ROOT / "tests" / "deploy" / "metric_names.txt"

HISTOGRAMS = {
    "txn_sidecar_transaction_tasks",
    "txn_sidecar_delivery_duration_seconds",
    "txn_sidecar_commit_to_delivery_seconds",
    "txn_sidecar_transaction_open_seconds",
}
# Label values fixed by the contract.
LABEL_VALUES = {
    ("txn_sidecar_records_consumed_total", "kind"): {"task", "commit", "abort", "invalid"},
    ("txn_sidecar_transactions_total", "outcome"): {
        "delivered", "aborted", "expired", "dead_lettered", "duplicate_skipped",
    },
    ("txn_sidecar_delivery_attempts_total", "result"): {"success", "conflict", "retryable", "permanent"},
    ("txn_sidecar_rebalances_total", "kind"): {"assign", "revoke", "error"},
    ("txn_sidecar_offset_commits_total", "result"): {"ok", "error"},
}
# Labels each metric carries per the contract, besides the target labels
# Prometheus adds (job, instance) and `le` on buckets.
METRIC_LABELS = {
    "txn_sidecar_records_consumed_total": {"kind"},
    "txn_sidecar_transactions_total": {"outcome"},
    "txn_sidecar_dead_letters_total": {"reason"},
    "txn_sidecar_delivery_attempts_total": {"result"},
    "txn_sidecar_rebalances_total": {"kind"},
    "txn_sidecar_consumer_lag_records": {"topic", "partition"},
    "txn_sidecar_commit_lag_records": {"topic", "partition"},
    "txn_sidecar_offset_commits_total": {"result"},
    "txn_sidecar_build_info": {"version"},
}
TARGET_LABELS = {"job", "instance"}

METRIC_RE = re.compile(r"\btxn_sidecar_[a-z0-9_]+\b")
SELECTOR_RE = re.compile(r"\b(txn_sidecar_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*')
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _names() -> list[str]:
    lines = NAMES_FILE.read_text().splitlines()
    assert all(line == line.strip() and line for line in lines), "one bare name per line, no blanks"
    return lines


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


def _base(name: str, names: set[str]) -> str:
    if name in names:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    raise AssertionError(f"{name} is not a txn-sidecar metric of the contract")


def test_metric_names_file_is_the_contract() -> None:
    names = _names()
    assert len(names) == len(set(names)) == 20
    assert all(re.fullmatch(r"txn_sidecar_[a-z0-9_]+", n) for n in names)
    assert HISTOGRAMS <= set(names)
    # Counters carry _total; histograms and gauges don't end in a series suffix.
    for n in names:
        assert not n.endswith(("_bucket", "_sum", "_count")), n


def test_dashboard_basics(dashboard) -> None:
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "txn-sidecar"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in _panels(dashboard):
        assert set(p["gridPos"]) == {"h", "w", "x", "y"}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_panels_do_not_overlap(dashboard) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_every_referenced_metric_is_in_the_contract(dashboard) -> None:
    names = set(_names())
    text = json.dumps(dashboard)
    referenced = set(METRIC_RE.findall(text))
    assert referenced, "the dashboard queries txn-sidecar metrics"
    for name in referenced:
        _base(name, names)


def test_every_contract_metric_is_on_the_dashboard(dashboard) -> None:
    names = set(_names())
    used = {_base(n, names) for n in METRIC_RE.findall(json.dumps(dashboard))}
    assert used == names, f"not on the dashboard: {sorted(names - used)}"


def test_histograms_are_queried_through_buckets(dashboard) -> None:
    exprs = "\n".join(_exprs(dashboard))
    for h in HISTOGRAMS:
        assert re.search(rf"histogram_quantile\([0-9.]+, sum by \(le\) \(rate\({h}_bucket\{{", exprs), h
        # A bare histogram name is not a series.
        assert not re.search(rf"\b{h}\b(?!_)", exprs), h


def test_label_matchers_and_groupings_use_contract_labels(dashboard) -> None:
    names = set(_names())
    for expr in _exprs(dashboard):
        for metric, body in SELECTOR_RE.findall(expr):
            base = _base(metric, names)
            allowed = METRIC_LABELS.get(base, set()) | TARGET_LABELS | ({"le"} if metric.endswith("_bucket") else set())
            rest = body
            for label, op, value in MATCHER_RE.findall(body):
                assert label in allowed, f"{metric} has no label {label!r}: {expr}"
                values = LABEL_VALUES.get((base, label))
                if values and not value.startswith("$"):
                    wanted = set(value.split("|")) if op in ("=~", "!~") else {value}
                    assert wanted <= values, f"{metric}{{{label}}}: {sorted(wanted - values)} not in the contract"
                rest = rest.replace(f'{label}{op}"{value}"', "", 1).replace(f'{label} {op} "{value}"', "", 1)
            assert not rest.replace(",", "").strip(), f"unparsed matcher text {rest!r} in {expr}"
        metrics = {_base(m, names) for m in METRIC_RE.findall(expr)}
        allowed = set().union(*(METRIC_LABELS.get(m, set()) for m in metrics)) | TARGET_LABELS | {"le"}
        for group in GROUPING_RE.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in allowed, f"grouping by {label!r} that {sorted(metrics)} lack: {expr}"


def test_required_panels(dashboard) -> None:
    titles = {p["title"] for p in _panels(dashboard)}
    for wanted in (
        "Records consumed by kind",
        "Transactions by outcome",
        "Commit marker to delivery",
        "Delivery duration",
        "Open transactions",
        "Staged bytes",
        "Consumer lag",
        "Commit lag",
        "Rebalances",
        "Assigned and paused partitions",
        "Dead letters by reason",
    ):
        assert wanted in titles, wanted
