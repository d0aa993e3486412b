#!/usr/bin/env bash
# Installs checkov, the policy checker tests/deploy/test_checkov.py runs on the rendered
# manifests, into its own venv outside the checkout: its pinned dependencies conflict with the
# project's, so it cannot share .venv. Idempotent: exits at once when the venv is complete.
set -euo pipefail

CHECKOV_VERSION=3.3.30
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/bazaar/checkov-${CHECKOV_VERSION}"
MARKER="$VENV/.complete"

if [[ -f $MARKER && -x $VENV/bin/checkov ]]; then
    exit 0
fi
echo "checkov.sh: installing checkov ${CHECKOV_VERSION} into ${VENV} (about a minute, once)"
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -qq --disable-pip-version-check "checkov==${CHECKOV_VERSION}" </dev/null
"$VENV/bin/checkov" --version >/dev/null
touch "$MARKER"
