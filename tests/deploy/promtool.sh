#!/usr/bin/env bash
# Makes sure promtool, which tests/deploy/test_rules.py runs on deploy/prometheus/rules.yaml,
# is on PATH: Debian's `prometheus` package (promtool 2.42 on bookworm) when it is missing and
# this runs as root, installed once, outside the checkout. Idempotent.
set -euo pipefail

if command -v promtool >/dev/null; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "promtool.sh: promtool is missing; install Debian's prometheus package" \
        "(apt-get install prometheus) or put a Prometheus release's promtool on PATH" >&2
    exit 1
fi
echo "promtool.sh: installing Debian's prometheus package for promtool (once)"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq prometheus </dev/null >/dev/null; then
    apt-get update -qq </dev/null >/dev/null  # a fresh machine's package lists may be stale
    apt-get install -y -qq prometheus </dev/null >/dev/null
fi
promtool --version >/dev/null
