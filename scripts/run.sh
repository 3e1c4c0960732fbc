#!/usr/bin/env bash
# Builds skiff and runs it on the default config, which pools the
# PostgreSQL on 127.0.0.1:5432 behind 127.0.0.1:6432.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked
exec target/release/skiff --config "${SKIFF_CONFIG:-config/skiff.toml}" "$@"
