#!/usr/bin/env bash
# Installs what the deployment checks need, idempotently:
#   - a Python venv at ${TXN_SIDECAR_VENV:-$HOME/.cache/txn-sidecar/venv}
#     with tests/deploy/requirements.txt (pinned) installed;
#   - kcat (Debian package), used by the interoperability tests.
# Re-running is cheap: the venv is reused and pip runs only when the
# requirements file changed since the last successful install.
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
