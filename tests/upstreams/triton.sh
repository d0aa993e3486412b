#!/usr/bin/env bash
# Installs PyTriton, whose wheel ships a Triton Inference Server binary, into its own venv
# outside the checkout (tests/upstreams/test_triton.py puts that server behind the gateway):
# its pins conflict with the project's. Idempotent: exits at once when the venv is complete.
set -euo pipefail

PYTRITON_VERSION=0.7.0
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/bazaar/pytriton-${PYTRITON_VERSION}"
MARKER="$VENV/.complete"

if [[ -f $MARKER && -x $VENV/bin/python ]]; then
    exit 0
fi
echo "triton.sh: installing nvidia-pytriton ${PYTRITON_VERSION} into ${VENV} (about a minute, once)"
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -qq --disable-pip-version-check \
    "nvidia-pytriton==${PYTRITON_VERSION}" </dev/null
"$VENV/bin/python" -c "import pytriton.triton"
touch "$MARKER"
