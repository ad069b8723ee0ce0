#!/usr/bin/env bash
# Checks formatting, lints and docs, then runs the whole workspace's test suite: unit tests, the protocol tests (a frontend in the test
# talking to the backend over a socket), and the end-to-end tests (vublk as a process, libblkio
# as the frontend). Installs what is missing first (scripts/prereqs.sh). Exits non-zero if any
# test fails; extra arguments go to `cargo test` (e.g. a test name filter).
#
# --no-fail-fast: every test binary runs, so one failure does not hide the others. The suite is
# capped at VUBLK_TEST_TIMEOUT (default 15 minutes) so a hung test fails instead of stalling CI.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/prereqs.sh
vublk_prereqs test

status=0
# The mechanical checks first: formatting, lints (warnings denied, SAFETY comments required),
# and the docs' links. Skipped when a test filter is given.
if (($# == 0)); then
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        rustup component add rustfmt clippy
    fi
    cargo fmt --all -- --check || status=$?
    cargo clippy --workspace --all-targets -- -D warnings || status=$?
    RUSTDOCFLAGS="-D warnings -A rustdoc::private-intra-doc-links" \
        cargo doc --workspace --no-deps --document-private-items || status=$?
fi
timeout --kill-after=30s "${VUBLK_TEST_TIMEOUT:-15m}" \
    cargo test --workspace --no-fail-fast "$@" || status=$?
# The lock-free memory pin protocol, model-checked with loom (its own build: --cfg loom).
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/loom" \
    timeout --kill-after=30s 10m cargo test -p vublk --lib loom_tests || status=$?
exit "$status"
