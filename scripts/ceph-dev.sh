#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for tests and benchmarks: one monitor, one manager and one
# OSD on 127.0.0.1, cephx on, no systemd, everything under DIR.
#
#   scripts/ceph-dev.sh start DIR   start it; prints nothing else than progress on stderr
#   scripts/ceph-dev.sh stop DIR    kill its daemons (SIGKILL) and remove DIR's contents
#
# After `start`, DIR/ceph.conf and DIR/keyring (client.admin's key, readable by the user who
# ran the script only) are what a client needs, and the pool `rbd` exists (rbd pool init):
#
#   rbd -c DIR/ceph.conf create --size 1G rbd/disk
#   vublk --blk-file rbd:rbd/disk --ceph-conf DIR/ceph.conf ...
#
# The OSD keeps its data in memory (memstore), with 4 KiB pages so random small writes do not
# grow it by whole objects; the pool has one replica. Nothing of it is meant to survive: `stop`
# uses SIGKILL (on SIGTERM memstore writes its whole store to disk first). Needs the Debian
# packages ceph-mon, ceph-mgr, ceph-osd and ceph-common (scripts/prereqs.sh installs them for
# `vublk_prereqs rbd`). Coming up takes about 12 s.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
(($# == 2)) || usage
cmd=$1
dir=$2

# Kills the daemons whose pid files are in DIR/run.
stop() {
    local pidfile pid
    for pidfile in "$dir"/run/*.pid; do
        [[ -e $pidfile ]] || continue
        pid=$(cat "$pidfile" 2>/dev/null || true)
        # Only a ceph daemon still running with this pid (the pid may have been reused).
        if [[ -n $pid ]] && grep -qs '^ceph-' "/proc/$pid/comm"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

# A TCP port on 127.0.0.1 nobody listens on, for the monitor.
free_port() {
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 20000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    echo "no free port found" >&2
    return 1
}

start() {
    local missing=() tool
    for tool in ceph ceph-mon ceph-mgr ceph-osd monmaptool ceph-authtool rbd; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        echo "$0: ${missing[*]} not found: install ceph-mon ceph-mgr ceph-osd ceph-common" >&2
        return 1
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    stop
    rm -rf "${dir:?}"/{mon,mgr,osd,run,log,ceph.conf,keyring,monmap}
    mkdir -p "$dir"/{mon/ceph-a,mgr/ceph-x,osd/ceph-0,run,log}

    local fsid port conf=$dir/ceph.conf
    fsid=$(cat /proc/sys/kernel/random/uuid)
    port=$(free_port)
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/keyring
run dir = $dir/run
crash dir = $dir/log/crash
# One OSD on one host: one replica, placed on OSDs rather than hosts.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# A build machine's disk may be fuller than a monitor likes (it warns under 30% free).
mon data avail warn = 1
mon data avail crit = 0
auth allow insecure global id reclaim = false
mon data = $dir/mon/\$cluster-\$id
mgr data = $dir/mgr/\$cluster-\$id
osd data = $dir/osd/\$cluster-\$id
# In memory, paged in 4 KiB pages: random 4 KiB writes otherwise grow it by whole objects.
osd objectstore = memstore
memstore page set = true
memstore page size = 4096
memstore device bytes = 8G
# The daemons' pid files (how \`stop\` finds them) and logs; clients keep librados' defaults.
[mon]
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
[mgr]
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
[osd]
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
EOF

    local keyring=$dir/keyring
    echo "ceph-dev: keys" >&2
    {
        ceph-authtool --create-keyring "$keyring" --gen-key -n mon. --cap mon 'allow *'
        ceph-authtool "$keyring" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *'
        ceph-authtool "$keyring" --gen-key -n mgr.x \
            --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *'
        ceph-authtool "$keyring" --gen-key -n osd.0 \
            --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
    } >/dev/null
    chmod 600 "$keyring"

    echo "ceph-dev: monitor on 127.0.0.1:$port" >&2
    monmaptool --create --addv a "[v2:127.0.0.1:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$keyring" &>>"$dir/log/mkfs.log"
    ceph-mon -c "$conf" -i a

    local ceph=(ceph -c "$conf" --connect-timeout 30)
    echo "ceph-dev: manager and OSD" >&2
    ceph-mgr -c "$conf" -i x
    local uuid
    uuid=$(cat /proc/sys/kernel/random/uuid)
    "${ceph[@]}" osd new "$uuid" 0 >/dev/null
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" &>>"$dir/log/mkfs.log"
    ceph-osd -c "$conf" -i 0 2>>"$dir/log/start.log"

    echo "ceph-dev: pool rbd" >&2
    "${ceph[@]}" osd pool create rbd 8 8 >/dev/null 2>&1
    rbd -c "$conf" pool init rbd

    # HEALTH_OK comes before the placement groups are active: wait for both.
    echo "ceph-dev: waiting for HEALTH_OK and active+clean placement groups" >&2
    local health pgs
    for _ in $(seq 240); do
        health=$("${ceph[@]}" health 2>/dev/null || true)
        # "9 pgs: 9 active+clean; ..."
        pgs=$("${ceph[@]}" pg stat 2>/dev/null || true)
        if [[ $health == HEALTH_OK* ]] &&
            [[ $pgs =~ ^([0-9]+)\ pgs:\ ([0-9]+)\ active\+clean\; ]] &&
            [[ ${BASH_REMATCH[1]} == "${BASH_REMATCH[2]}" ]]; then
            echo "ceph-dev: up ($pgs)" >&2
            return 0
        fi
        sleep 0.5
    done
    echo "ceph-dev: the cluster did not become healthy: $health; $pgs (logs in $dir/log)" >&2
    return 1
}

case "$cmd" in
start) start ;;
stop)
    [[ -d $dir ]] || exit 0
    stop
    rm -rf "${dir:?}"/{mon,mgr,osd,run,log,ceph.conf,keyring,monmap}
    ;;
*) usage ;;
esac
