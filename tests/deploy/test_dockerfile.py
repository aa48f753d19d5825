"""Dockerfile and .dockerignore, checked statically (no Docker daemon here)."""

from __future__ import annotations

import fnmatch
import json
import re

import pytest

from deploylib import ROOT


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line = buf + line
        buf = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        assert stages, f"{ins[0]} before FROM"
        stages[-1].append(ins)
    return stages


@pytest.fixture(scope="module")
def stages():
    return _stages()


def test_two_stages(stages) -> None:
    assert [s[0][1] for s in stages] == [
        "rust:1-bookworm AS builder",
        "gcr.io/distroless/cc-debian12:nonroot",
    ]


def test_builder_installs_build_deps_and_builds_locked_release(stages) -> None:
    runs = " ".join(args for ins, args in stages[0] if ins == "RUN")
    for pkg in ("cmake", "libssl-dev", "pkg-config", "libsasl2-dev", "zlib1g-dev"):
        assert re.search(rf"apt-get install[^&]*\b{re.escape(pkg)}\b", runs), pkg
    builds = re.findall(r"cargo build ([^&]+?)(?:&&|$)", runs)
    assert len(builds) == 2, "a dependency-only build and the real build"
    for b in builds:
        assert set(b.split()) >= {"--release", "--locked", "--bin", "txn-sidecar"}, b


def test_dependency_layer_comes_before_sources(stages) -> None:
    builder = stages[0]
    copies = [(i, args) for i, (ins, args) in enumerate(builder) if ins == "COPY"]
    manifest = next(i for i, args in copies if args.split() == ["Cargo.toml", "Cargo.lock", "./"])
    sources = next(i for i, args in copies if args.split()[0] == "src")
    dep_build = next(i for i, (ins, args) in enumerate(builder) if ins == "RUN" and "cargo build" in args)
    assert manifest < dep_build < sources


def test_zlib_is_static_for_distroless(stages) -> None:
    # distroless/cc-debian12 has no zlib1g; the ldd guard in the builder
    # fails the build if something else dynamic sneaks in.
    assert ("ENV", "LIBZ_SYS_STATIC=1") in stages[0]
    assert any(ins == "RUN" and "ldd /usr/local/bin/txn-sidecar" in args for ins, args in stages[0])


def test_runtime_stage(stages) -> None:
    runtime = dict((ins, args) for ins, args in stages[1] if ins != "COPY")
    copies = [args for ins, args in stages[1] if ins == "COPY"]
    assert copies == ["--from=builder /usr/local/bin/txn-sidecar /usr/local/bin/txn-sidecar"]
    assert json.loads(runtime["ENTRYPOINT"]) == ["/usr/local/bin/txn-sidecar"]
    assert json.loads(runtime["CMD"]) == ["run"]
    assert runtime["EXPOSE"] == "9464"
    # Numeric, so Kubernetes' runAsNonRoot can verify it.
    assert runtime["USER"] == "65532:65532"
    assert "RUN" not in runtime, "distroless has no shell"
    assert not any(ins == "ENV" and args.startswith("TXN_SIDECAR_") for ins, args in stages[1]), (
        "env would override the user's config file"
    )


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or fnmatch.fnmatch(path, pat.replace("**/", "")):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_build_inputs() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("Cargo.toml", "Cargo.lock", "src/main.rs"):
        assert not _ignored(needed, patterns), needed
    for heavy in ("target/release/txn-sidecar", ".git/HEAD", "helm/txn-sidecar/Chart.yaml"):
        assert _ignored(heavy, patterns), heavy
