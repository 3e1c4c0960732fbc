#!/usr/bin/env bash
# Installs what the tests need, then runs every test against real servers
# the tests start themselves on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --locked "$@"
