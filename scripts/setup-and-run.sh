#!/usr/bin/env bash
# Builds vublk and serves a scratch image: installs what is missing (scripts/prereqs.sh), builds
# the release binary, creates /tmp/vublk.img (1 GiB, sparse) unless it exists, and runs
#
#   vublk --socket-path /tmp/vublk.sock --blk-file /tmp/vublk.img [extra options]
#
# in the foreground. Extra arguments go to vublk (e.g. --num-queues 4). Ctrl-C or SIGTERM stops
# it; it removes the socket and exits 0. VUBLK_IMG, VUBLK_IMG_SIZE and VUBLK_SOCK override the
# defaults.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/prereqs.sh
vublk_prereqs build

img=${VUBLK_IMG:-/tmp/vublk.img}
size=${VUBLK_IMG_SIZE:-1G}
sock=${VUBLK_SOCK:-/tmp/vublk.sock}

cargo build --release --bin vublk
if [[ ! -e $img ]]; then
    truncate -s "$size" "$img"
    echo "created scratch image $img ($size)" >&2
fi
# exec: vublk itself receives Ctrl-C and SIGTERM, and its exit code is ours.
exec target/release/vublk --socket-path "$sock" --blk-file "$img" "$@"
