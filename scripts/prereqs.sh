# shellcheck shell=bash
# Sourced by the other scripts: `vublk_prereqs build|test|fuzz|rbd` installs what building (or
# building and testing, fuzzing, or running a Ceph cluster for) vublk needs on Debian 12, and
# does nothing when it is all there.
#
#   build   a C linker and libc (Rust links through `cc`) and a Rust toolchain
#   test    the same, plus VUBLK_TEST_PACKAGES, VUBLK_RBD_PACKAGES and QEMU (VUBLK_QEMU_PACKAGES),
#           and on Debian 12 its own QEMU 7.2 unpacked beside them (vublk_qemu72)
#   fuzz    build's, plus VUBLK_FUZZ_PACKAGES (scripts/fuzz.sh)
#   rbd     build's, plus VUBLK_RBD_PACKAGES (a throwaway Ceph cluster: scripts/ceph-dev.sh)
#
# apt-get runs only when a package is missing (or QEMU is older than VUBLK_QEMU_MIN), so a
# prepared machine (CI) pays nothing. When not root and something is missing, it says what to
# install and fails.

# Debian packages the test suite needs beyond a Rust toolchain and QEMU (the end-to-end tests
# drive vublk with libblkio, a crate linked into them). For the guest tests (guest-tests/,
# docs/testing.md):
#   fio              copied into the guest with the libraries it links (the guest's fio); on the
#                    host, the disk's own limit in vublk-bench
#   xz-utils         unpacks Debian's kernel so QEMU boots it without its slow decompressor
#   systemd          systemd-analyze verify and systemd-socket-activate for the unit files (vmm-glue)
#   podman runc      build and run the container image (vmm-glue/tests/container.rs); runc named
#                    so apt does not pick crun, which refuses hybrid cgroup hierarchies
#   libvirt-clients libxml2-utils  virt-xml-validate (and the xmllint it runs) for the
#                    libvirt domain in docs/deploy.md (vmm-glue)
#   prometheus       promtool check metrics, and a Prometheus server scraping --metrics-addr
#                    (backend/tests/metrics.rs)
# The guest's kernel and busybox are not installed: the tests fetch their .debs with
# `apt-get download` at run time and cache them under target/guest-cache.
VUBLK_TEST_PACKAGES=(fio xz-utils systemd podman runc libvirt-clients libxml2-utils prometheus)
VUBLK_BUILD_PACKAGES=(gcc libc6-dev)
# scripts/fuzz.sh: libfuzzer-sys compiles libFuzzer's C++ sources and links libstdc++.
VUBLK_FUZZ_PACKAGES=(g++)

# Ceph 16.2 (Debian 12's), for the RBD backing's tests and benchmark: scripts/ceph-dev.sh runs a
# one-node cluster from the daemons, and vublk loads librbd (librbd-dev brings librbd1 and
# librados2, and the headers the FFI declarations were checked against) at run time. vublk builds
# and runs without them; its RBD tests skip when they are missing.
VUBLK_RBD_PACKAGES=(ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev)

# QEMU, the current release rather than Debian 12's 7.2 (three years old): the guest tests boot
# qemu-system-x86_64 and vublk-bench measures against qemu-storage-daemon, and both should be the
# peer users run today. On Debian 12 they come from bookworm-backports (same archive, one more
# apt source: VUBLK_BACKPORTS_LIST), which has 10.0; elsewhere from the distribution as it is.
#   qemu-system-x86  qemu-system-x86_64 (and qemu-system-common with it)
#   qemu-utils       qemu-storage-daemon (Debian 12 ships it in qemu-system-common; the 10.0
#                    packages in qemu-utils)
# qemu-block-extra is not needed: it holds the network block drivers (curl, iSCSI, NFS, RBD,
# ...); the file driver with aio=io_uring and null-co that the bench uses are built in. Only
# `vublk-bench --media rbd --systems qsd` needs it (QSD's rbd driver), installed by hand:
# `apt-get install -t bookworm-backports qemu-block-extra`.
VUBLK_QEMU_PACKAGES=(qemu-system-x86 qemu-utils)
VUBLK_QEMU_MIN=1:10.0
VUBLK_BACKPORTS_LIST=/etc/apt/sources.list.d/vublk-bookworm-backports.list

# Debian 12's own QEMU 7.2 as well, for the guest tests that run on both (migration, inflight
# recovery: docs/testing.md): the peer of users who stay on Debian's QEMU. Its packages have the
# same names as 10.0's, so it is not installed: vublk_qemu72 fetches bookworm's .debs with
# `apt-get download` and unpacks them with `dpkg-deb -x` into VUBLK_QEMU72_DIR. The binary finds
# its data relative to itself (Debian builds it relocatable): ../share/qemu (qemu-system-data),
# ../share/seabios (bookworm's seabios, the BIOS 7.2 shipped with) and its modules under
# ../lib/x86_64-linux-gnu/qemu (qemu-system-common; TCG is a module). The libraries it links are
# Debian 12's, installed with 10.0.
VUBLK_QEMU72_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
VUBLK_QEMU72_DIR=${VUBLK_QEMU72_DIR:-/opt/vublk-qemu-7.2}

# The newest version of package $1 in Debian 12's own suites (not bookworm-backports).
vublk_bookworm_version() {
    apt-cache madison "$1" | awk -F' *[|] *' '$2 !~ /bpo/ && $3 !~ /backports/ { print $2; exit }'
}

# Unpacks Debian 12's QEMU 7.2 into VUBLK_QEMU72_DIR unless it is there (its .complete file).
vublk_qemu72() {
    local dir=$VUBLK_QEMU72_DIR
    [[ -f $dir/.complete && -x $dir/usr/bin/qemu-system-x86_64 ]] && return 0
    vublk_is_bookworm || return 0
    local parent
    parent=$(dirname "$dir")
    if ! mkdir -p "$parent" 2>/dev/null || [[ ! -w $parent ]]; then
        echo "cannot write $parent for Debian 12's QEMU 7.2: run as root, or set" \
            "VUBLK_QEMU72_DIR to a directory of yours" >&2
        return 1
    fi
    if [[ -z $(vublk_bookworm_version qemu-system-x86) ]]; then
        env DEBIAN_FRONTEND=noninteractive apt-get -q update || return 1
    fi
    local tmp p v debs=()
    tmp=$(mktemp -d) || return 1
    # apt's download sandbox (user _apt) must be able to write there.
    chmod 755 "$tmp"
    for p in "${VUBLK_QEMU72_PACKAGES[@]}"; do
        v=$(vublk_bookworm_version "$p")
        if [[ -z $v ]]; then
            echo "no Debian 12 version of $p in apt's lists" >&2
            rm -rf "$tmp"
            return 1
        fi
        debs+=("$p=$v")
    done
    echo "unpacking Debian 12's QEMU 7.2 (${debs[*]}) into $dir" >&2
    if ! (cd "$tmp" && apt-get -q download "${debs[@]}"); then
        rm -rf "$tmp"
        return 1
    fi
    rm -rf "$dir.new"
    mkdir -p "$dir.new"
    for p in "$tmp"/*.deb; do
        dpkg-deb -x "$p" "$dir.new" || { rm -rf "$tmp" "$dir.new"; return 1; }
    done
    rm -rf "$tmp"
    if ! "$dir.new/usr/bin/qemu-system-x86_64" --version >/dev/null; then
        echo "the unpacked QEMU 7.2 does not run (a library missing? ldd" \
            "$dir.new/usr/bin/qemu-system-x86_64)" >&2
        return 1
    fi
    printf '%s\n' "${debs[@]}" >"$dir.new/.complete"
    rm -rf "$dir"
    mv "$dir.new" "$dir"
}

# Whether this is Debian 12, where QEMU comes from bookworm-backports.
vublk_is_bookworm() {
    local codename
    codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
    [[ $codename == bookworm ]]
}

# Adds bookworm-backports to apt's sources (a file of its own) unless a source already has it.
vublk_add_backports() {
    if grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    echo "adding bookworm-backports to apt's sources ($VUBLK_BACKPORTS_LIST) for QEMU 10" >&2
    echo 'deb http://deb.debian.org/debian bookworm-backports main' >"$VUBLK_BACKPORTS_LIST"
}

# The oldest toolchain the workspace builds with (rust-version in Cargo.toml); Debian 12's own
# cargo is older, so the toolchain comes from rustup.
VUBLK_RUST_VERSION=1.85

vublk_prereqs() {
    local packages=("${VUBLK_BUILD_PACKAGES[@]}")
    case "${1:-build}" in
    build) ;;
    test) packages+=(${VUBLK_TEST_PACKAGES[@]+"${VUBLK_TEST_PACKAGES[@]}"} "${VUBLK_RBD_PACKAGES[@]}") ;;
    fuzz) packages+=("${VUBLK_FUZZ_PACKAGES[@]}") ;;
    rbd) packages+=("${VUBLK_RBD_PACKAGES[@]}") ;;
    *)
        echo "vublk_prereqs: build, test, fuzz or rbd, not '$1'" >&2
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

    local qemu_packages=()
    [[ ${1:-build} == test ]] && qemu_packages=("${VUBLK_QEMU_PACKAGES[@]}")

    local missing=() qemu_missing=() p
    if ! command -v dpkg-query >/dev/null; then
        # Not Debian: the packages are the user's business; the build says what is missing.
        packages=()
        qemu_packages=()
    fi
    for p in ${packages[@]+"${packages[@]}"}; do
        # Only a fully installed package reports "install ok installed".
        if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    local backports=
    vublk_is_bookworm && backports=1
    for p in ${qemu_packages[@]+"${qemu_packages[@]}"}; do
        # On Debian 12, Debian's own 7.2 counts as missing.
        if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]] ||
            { [[ -n $backports ]] && dpkg --compare-versions \
                "$(dpkg-query -W -f='${Version}' "$p")" lt "$VUBLK_QEMU_MIN"; }; then
            qemu_missing+=("$p")
        fi
    done
    if ((${#missing[@]} + ${#qemu_missing[@]})); then
        if [[ $(id -u) -ne 0 ]]; then
            local all=("${missing[@]}" "${qemu_missing[@]}")
            echo "vublk needs these Debian packages: ${all[*]}" >&2
            if ((${#missing[@]})); then
                echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
            fi
            if ((${#qemu_missing[@]})) && [[ -n $backports ]]; then
                echo "and QEMU ${VUBLK_QEMU_MIN#*:} or later from bookworm-backports: add" \
                    "'deb http://deb.debian.org/debian bookworm-backports main' to apt's sources," \
                    "then: sudo apt-get update &&" \
                    "sudo apt-get install -y -t bookworm-backports ${qemu_missing[*]}" >&2
            elif ((${#qemu_missing[@]})); then
                echo "install them with: sudo apt-get install -y ${qemu_missing[*]}" >&2
            fi
            return 1
        fi
        if ((${#qemu_missing[@]})) && [[ -n $backports ]]; then
            vublk_add_backports
        fi
        local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q)
        "${apt[@]}" update
        if ((${#missing[@]})); then
            echo "installing ${missing[*]}" >&2
            "${apt[@]}" install -y --no-install-recommends "${missing[@]}"
        fi
        if ((${#qemu_missing[@]})); then
            # -t only for QEMU (and what it depends on): everything else stays on Debian 12's
            # own versions.
            echo "installing ${qemu_missing[*]}${backports:+ from bookworm-backports}" >&2
            "${apt[@]}" install -y --no-install-recommends ${backports:+-t bookworm-backports} \
                "${qemu_missing[@]}"
        fi
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

    if [[ ${1:-build} == test ]] && command -v dpkg-query >/dev/null; then
        vublk_qemu72 || return 1
    fi

    local have
    have=$(rustc --version 2>/dev/null | awk '{print $2}')
    if [[ "$(printf '%s\n%s\n' "$VUBLK_RUST_VERSION" "$have" | sort -V | head -n1)" != "$VUBLK_RUST_VERSION" ]]; then
        echo "rustc $have is older than $VUBLK_RUST_VERSION: run 'rustup update stable'" >&2
        return 1
    fi
}
