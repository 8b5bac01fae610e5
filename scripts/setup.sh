#!/usr/bin/env bash
# Set up fleetprune in ./.venv on a fresh machine (idempotent: a second run is quick).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torchvision needs the torch release it was built with; these two are on the local disk of our
# CPU machines. Elsewhere pip fetches them (any torch>=2.1 with a matching torchvision works).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
