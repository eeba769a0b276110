#!/usr/bin/env bash
# Rebuilds the C++ extension into .venv after a change under cpp/ or bindings/ (incremental, in build/).
# Serialised by a lock so that several shells (or helper sessions) never run two builds in one build tree.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/pymemory-build.lock .venv/bin/pip install -q --no-build-isolation --no-deps -e . "$@"
