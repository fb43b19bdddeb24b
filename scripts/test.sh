#!/usr/bin/env bash
# The project's test command (README's second command; .ci/run calls it).
# Installs what the tests need (Debian packages; Python packages into .venv), then runs lint, types and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests start for real: an MQTT broker, curl, and the benchmark smoke's
# load generator, HAProxy (the seed's set-up) and nginx (stub workers).
need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
for tool in curl wrk; do command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool"); done
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The project's own virtualenv (.venv, shared with scripts/demo.sh): exact versions, checked by hash
# (requirements.lock; docs/security.md says how to update it), then the project itself on top of them.
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
"$py" -m pip install -q --disable-pip-version-check --no-deps -e .

echo "== ruff"; "$py" -m ruff check balancer tests scripts
echo "== mypy"; "$py" -m mypy
echo "== pytest"; "$py" -m pytest "$@"
