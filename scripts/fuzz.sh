#!/usr/bin/env bash
# Runs one of vublk's fuzz targets (fuzz/, docs/security.md#fuzzing) with libFuzzer on the
# stable toolchain: libfuzzer-sys links libFuzzer (built from its C++ sources, hence g++), and
# the coverage instrumentation libFuzzer needs is asked of rustc's LLVM directly (sancov
# flags), so no nightly compiler and no cargo-fuzz.
#
#   scripts/fuzz.sh TARGET              fuzz for 10 minutes
#   scripts/fuzz.sh TARGET SECONDS      fuzz for SECONDS
#   scripts/fuzz.sh TARGET -runs=N      fuzz for N executions
#   scripts/fuzz.sh TARGET ... ARGS     more libFuzzer options (-jobs=2, -max_len=8192, ...)
#   scripts/fuzz.sh TARGET FILE...      replay inputs (a crash: fuzz/crashes/TARGET/crash-*)
#
# TARGET is request, session, memory or inflight. The corpus grows in target/fuzz-corpus/TARGET
# (seeded from fuzz/corpus/TARGET), crashes land in fuzz/crashes/TARGET. Runs under `nice -n 15`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/prereqs.sh
vublk_prereqs fuzz

targets=(request session memory inflight)
target=${1:-}
if [[ ! " ${targets[*]} " == *" $target "* ]]; then
    echo "usage: scripts/fuzz.sh TARGET [SECONDS | -runs=N | FILE...] [libFuzzer options]" >&2
    echo "TARGET: ${targets[*]}" >&2
    exit 2
fi
shift
limit=(-max_total_time=600)
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
    limit=(-max_total_time="$1")
    shift
elif [[ ${1:-} == -runs=* ]]; then
    limit=("$1")
    shift
fi

host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/fuzz
# With an explicit --target these flags reach the fuzz crate and its dependencies (vublk, the
# vhost and virtio crates), not build scripts or proc-macros. Level 4 instruments every edge;
# inline 8-bit counters and the PC table are what libFuzzer reads as coverage; trace-compares
# lets it solve the comparisons (magic values, sizes) guarding a branch. Debug assertions and
# overflow checks stay on: an overflow is a crash worth finding.
export RUSTFLAGS="${RUSTFLAGS:-} --cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cdebug-assertions -Coverflow-checks -Cdebuginfo=1 -Cforce-frame-pointers"
nice -n 15 cargo build --release --target "$host" -p vublk-fuzz --features libfuzzer --bin "$target"
binary=$CARGO_TARGET_DIR/$host/release/$target

if [[ -e ${1:-} ]]; then
    # Replaying files: no corpus, no time limit.
    exec nice -n 15 "$binary" "$@"
fi
corpus=${CARGO_TARGET_DIR%/fuzz}/fuzz-corpus/$target
crashes=fuzz/crashes/$target
mkdir -p "$corpus" "$crashes"
exec nice -n 15 "$binary" -artifact_prefix="$crashes/" -print_final_stats=1 \
    "${limit[@]}" "$@" "$corpus" "fuzz/corpus/$target"
