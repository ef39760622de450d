#!/usr/bin/env bash
# Create bench/.venv: plexus (editable, with the CAN extra) plus the peers it
# is measured against. None of these is a dependency of the package itself.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$here/.venv/bin/python" ]; then
    "$python" -m venv "$here/.venv"
fi
pip="$here/.venv/bin/python -m pip"
$pip install --quiet --upgrade pip
$pip install --quiet \
    -e "$root[can]" \
    influxdb-client \
    httpx \
    orjson \
    psutil \
    py-spy
# The official SDK (PyPI plexus-python) is also imported as `plexus`, so it
# cannot share site-packages with this project: it goes into its own folder,
# put first on PYTHONPATH only in the subprocesses that measure it
# (bench/peers.py). Its one dependency, websocket-client, is installed above.
$pip install --quiet websocket-client
$pip install --quiet --no-deps --upgrade --target "$here/.venv/sdk" "plexus-python==0.16.0"
echo "bench virtualenv ready: $here/.venv/bin/python"
