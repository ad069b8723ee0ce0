#!/usr/bin/env bash
# Builds the vublk container image (the top-level Dockerfile) with podman, offline: the release
# binary is built here, and the build context is a root filesystem holding only that binary and
# the shared libraries it links, copied from this machine, so no base image is pulled.
#
#   scripts/container-image.sh [TAG]          # default tag: vublk
#
# VUBLK_BIN uses that binary instead of `cargo build --release -p vublk` (CARGO_TARGET_DIR is
# honoured); PODMAN names the podman binary. Build on the distribution the image should carry
# the libraries of (Debian 12 here): they are this machine's. vublk links only libc, libgcc_s
# and the dynamic loader; a dependency that links another C library is picked up by ldd too.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
tag=${1:-vublk}
podman=${PODMAN:-podman}

bin=${VUBLK_BIN:-}
if [[ -z $bin ]]; then
    "${CARGO:-cargo}" build --release -p vublk --bin vublk
    bin=${CARGO_TARGET_DIR:-target}/release/vublk
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
install -D -m 0755 "$bin" "$ctx/rootfs/usr/local/bin/vublk"
# ldd prints "name => /path (addr)" for libraries and "/path (addr)" for the loader; the vDSO
# has no path. Each file goes where the binary (or the loader's search path) looks for it,
# symlinks resolved.
if ldd_out=$(ldd "$bin"); then
    libs=$(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$ldd_out")
    if grep -q "not found" <<<"$ldd_out"; then
        echo "$bin links a library this machine does not have:" >&2
        echo "$ldd_out" >&2
        exit 1
    fi
    for lib in $libs; do
        install -D -m 0755 "$lib" "$ctx/rootfs$lib"
    done
else
    echo "$bin is not dynamically linked: copying no libraries" >&2
fi
cp Dockerfile "$ctx/Dockerfile"

"$podman" build --pull=never --tag "$tag" --file "$ctx/Dockerfile" "$ctx"
