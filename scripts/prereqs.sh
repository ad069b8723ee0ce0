# shellcheck shell=bash
# Sourced by the other scripts: `vublk_prereqs build|test` installs what building (or building
# and testing) vublk needs on Debian 12, and does nothing when it is all there.
#
#   build   a C linker and libc (Rust links through `cc`) and a Rust toolchain
#   test    the same, plus TEST_PACKAGES
#
# apt-get runs only when a package is missing, so a prepared machine (CI) pays nothing. When not
# root and something is missing, it says what to install and fails.

# Debian packages the test suite needs beyond a Rust toolchain (the end-to-end tests drive vublk
# with libblkio, a crate linked into them). For the guest tests (guest-tests/, docs/testing.md):
#   qemu-system-x86  runs the guests
#   fio              copied into the guest with the libraries it links (the guest's fio)
#   xz-utils         unpacks Debian's kernel so QEMU boots it without its slow decompressor
#   systemd          systemd-analyze verify and systemd-socket-activate for the unit files (vmm-glue)
#   podman runc      build and run the container image (vmm-glue/tests/container.rs); runc named
#                    so apt does not pick crun, which refuses hybrid cgroup hierarchies
#   libvirt-clients libxml2-utils  virt-xml-validate (and the xmllint it runs) for the
#                    libvirt domain in docs/deploy.md (vmm-glue)
# The guest's kernel and busybox are not installed: the tests fetch their .debs with
# `apt-get download` at run time and cache them under target/guest-cache.
VUBLK_TEST_PACKAGES=(qemu-system-x86 fio xz-utils systemd podman runc libvirt-clients libxml2-utils)
VUBLK_BUILD_PACKAGES=(gcc libc6-dev)

# The oldest toolchain the workspace builds with (rust-version in Cargo.toml); Debian 12's own
# cargo is older, so the toolchain comes from rustup.
VUBLK_RUST_VERSION=1.85

vublk_prereqs() {
    local packages=("${VUBLK_BUILD_PACKAGES[@]}")
    case "${1:-build}" in
    build) ;;
    test) packages+=(${VUBLK_TEST_PACKAGES[@]+"${VUBLK_TEST_PACKAGES[@]}"}) ;;
    *)
        echo "vublk_prereqs: build or test, not '$1'" >&2
        return 2
        ;;
    esac

    if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    local need_rustup=
    if ! command -v cargo >/dev/null; then
        need_rustup=1
        packages+=(curl ca-certificates)
    fi

    local missing=() p
    if ! command -v dpkg-query >/dev/null; then
        # Not Debian: the packages are the user's business; the build says what is missing.
        packages=()
    fi
    for p in ${packages[@]+"${packages[@]}"}; do
        # Only a fully installed package reports "install ok installed".
        if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) -ne 0 ]]; then
            echo "vublk needs these Debian packages: ${missing[*]}" >&2
            echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
            return 1
        fi
        echo "installing ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi

    if [[ -n $need_rustup ]]; then
        echo "cargo not found: installing the Rust toolchain with rustup (https://rustup.rs)" >&2
        local installer
        installer=$(mktemp)
        if ! curl --proto '=https' --tlsv1.2 -sSf -o "$installer" https://sh.rustup.rs ||
            ! sh "$installer" -y --profile minimal; then
            rm -f "$installer"
            echo "could not install rustup; install a Rust toolchain and run this again" >&2
            return 1
        fi
        rm -f "$installer"
        export PATH="$HOME/.cargo/bin:$PATH"
    fi

    local have
    have=$(rustc --version 2>/dev/null | awk '{print $2}')
    if [[ "$(printf '%s\n%s\n' "$VUBLK_RUST_VERSION" "$have" | sort -V | head -n1)" != "$VUBLK_RUST_VERSION" ]]; then
        echo "rustc $have is older than $VUBLK_RUST_VERSION: run 'rustup update stable'" >&2
        return 1
    fi
}
