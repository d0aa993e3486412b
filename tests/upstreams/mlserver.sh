#!/usr/bin/env bash
# Installs MLServer, the real v2 server tests/upstreams/test_mlserver.py puts behind the
# gateway, into its own venv outside the checkout: its pins (FastAPI's Starlette, protobuf,
# grpcio) conflict with the project's, so it cannot share .venv. Idempotent: exits at once
# when the venv is complete.
set -euo pipefail

MLSERVER_VERSION=1.7.1
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/bazaar/mlserver-${MLSERVER_VERSION}"
MARKER="$VENV/.complete"

if [[ -f $MARKER && -x $VENV/bin/mlserver ]]; then
    exit 0
fi
echo "mlserver.sh: installing mlserver ${MLSERVER_VERSION} into ${VENV} (about a minute, once)"
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -qq --disable-pip-version-check \
    "mlserver==${MLSERVER_VERSION}" </dev/null
"$VENV/bin/mlserver" --help >/dev/null
touch "$MARKER"
