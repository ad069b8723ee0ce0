#!/usr/bin/env bash
# Runs the whole workspace's test suite: unit tests, the protocol tests (a frontend in the test
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

timeout --kill-after=30s "${VUBLK_TEST_TIMEOUT:-15m}" \
    cargo test --workspace --no-fail-fast "$@"
