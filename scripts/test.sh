#!/usr/bin/env bash
# The project's test command (README's second command; .ci/run calls it).
# Installs what the tests need (Python packages, Debian's mosquitto), then runs lint, types and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff"; python3 -m ruff check balancer tests scripts
echo "== mypy"; python3 -m mypy
echo "== pytest"; python3 -m pytest "$@"
