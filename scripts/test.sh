#!/usr/bin/env bash
# The one test command (README "Running tests"): formatting, lints as errors, every test.
# Installs what the tests need (Python packages for reference checks) into .venv when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-python.sh
cargo fmt --all --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
