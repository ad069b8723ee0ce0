#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for tests and benchmarks: one monitor, one manager and one
# OSD on 127.0.0.1, cephx on, no systemd, everything under DIR.
#
#   scripts/ceph-dev.sh start DIR    start it; prints nothing else than progress on stderr
#   scripts/ceph-dev.sh stop DIR     kill its daemons (SIGKILL) and remove DIR's contents
#   scripts/ceph-dev.sh halt DIR     stop its daemons cleanly (SIGTERM, OSD first) and wait for
#                                    them to exit; the OSD writes its store to disk, so nothing
#                                    is lost
#   scripts/ceph-dev.sh resume DIR   start a halted cluster's daemons again and wait until its
#                                    placement groups are active
#   scripts/ceph-dev.sh restart DIR  halt, then resume (a whole cluster going down and back)
#
# After `start`, DIR/ceph.conf and DIR/keyring (client.admin's key, readable by the user who
# ran the script only) are what a client needs, and the pool `rbd` exists (rbd pool init):
#
#   rbd -c DIR/ceph.conf create --size 1G rbd/disk
#   vublk --blk-file rbd:rbd/disk --ceph-conf DIR/ceph.conf ...
#
# The OSD keeps its data in memory (memstore), with 4 KiB pages so random small writes do not
# grow it by whole objects; the pool has one replica. Nothing of it is meant to survive: `stop`
# uses SIGKILL (on SIGTERM memstore writes its whole store to disk first, which is what `halt`
# relies on). Needs the Debian
# packages ceph-mon, ceph-mgr, ceph-osd and ceph-common (scripts/prereqs.sh installs them for
# `vublk_prereqs rbd`). Coming up takes about 12 s.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|halt|resume|restart DIR" >&2
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

# The pid in DIR/run/NAME.pid if a ceph daemon still runs with it (pids may be reused).
running_pid() {
    local pid
    pid=$(cat "$dir/run/$1.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && grep -qs '^ceph-' "/proc/$pid/comm"; then
        echo "$pid"
    fi
}

# Stops the daemons cleanly, the OSD first (it tells the monitor it is going, and memstore
# writes its store to DIR/osd), then the manager and the monitor; waits for each to exit.
halt() {
    local name pid
    for name in osd.0 mgr.x mon.a; do
        pid=$(running_pid "$name")
        [[ -n $pid ]] || continue
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1200); do
            [[ -e /proc/$pid ]] || break
            sleep 0.05
        done
        if [[ -e /proc/$pid ]]; then
            echo "ceph-dev: $name (pid $pid) did not exit within 60 s of SIGTERM" >&2
            return 1
        fi
    done
    echo "ceph-dev: halted" >&2
}

# Starts the monitor and the manager of DIR's configuration (the OSD needs the monitor's
# answer to be created, so `start` and `resume` start it themselves).
start_mon_mgr() {
    ceph-mon -c "$dir/ceph.conf" -i a
    ceph-mgr -c "$dir/ceph.conf" -i x
}

# Waits for HEALTH_OK and every placement group active+clean: HEALTH_OK comes first. With
# `pgs`, only for the placement groups: after a restart they serve I/O long before the health
# warnings of the restart (the OSD's slow requests) clear.
wait_healthy() {
    local ceph=(ceph -c "$dir/ceph.conf" --connect-timeout 30)
    local health pgs
    if [[ ${1:-} == pgs ]]; then
        echo "ceph-dev: waiting for active+clean placement groups" >&2
    else
        echo "ceph-dev: waiting for HEALTH_OK and active+clean placement groups" >&2
    fi
    for _ in $(seq 240); do
        health=$("${ceph[@]}" health 2>/dev/null || true)
        # The OSD marked itself down when halted: wait for it to be up before trusting `pg stat`.
        if [[ ${1:-} == pgs ]]; then
            [[ $("${ceph[@]}" osd stat 2>/dev/null || true) == *"1 up"* ]] || health=down
            [[ $health == down ]] || health="HEALTH_OK (not waited for: $health)"
        fi
        # "9 pgs: 9 active+clean; ..."
        pgs=$("${ceph[@]}" pg stat 2>/dev/null || true)
        if [[ $health == HEALTH_OK* ]] &&
            [[ $pgs =~ ^([0-9]+)\ pgs:\ ([0-9]+)\ active\+clean\; ]] &&
            [[ ${BASH_REMATCH[1]} == "${BASH_REMATCH[2]}" ]]; then
            echo "ceph-dev: up ($pgs; ${health#HEALTH_OK })" >&2
            return 0
        fi
        sleep 0.5
    done
    echo "ceph-dev: the cluster did not become healthy: $health; $pgs (logs in $dir/log)" >&2
    return 1
}

# Starts a halted cluster's daemons on the data they left in DIR.
resume() {
    if [[ -n $(running_pid mon.a) || -n $(running_pid osd.0) ]]; then
        echo "ceph-dev: the cluster in $dir is running: halt it first" >&2
        return 1
    fi
    echo "ceph-dev: resuming" >&2
    start_mon_mgr
    ceph-osd -c "$dir/ceph.conf" -i 0 2>>"$dir/log/start.log"
    wait_healthy pgs
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
# On SIGTERM, unmount the store (memstore writes itself to DIR/osd) instead of exiting at once:
# \`halt\` and \`resume\` keep the data.
osd fast shutdown = false
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
    echo "ceph-dev: monitor, manager and OSD" >&2
    start_mon_mgr

    local ceph=(ceph -c "$conf" --connect-timeout 30)
    local uuid
    uuid=$(cat /proc/sys/kernel/random/uuid)
    "${ceph[@]}" osd new "$uuid" 0 >/dev/null
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" &>>"$dir/log/mkfs.log"
    ceph-osd -c "$conf" -i 0 2>>"$dir/log/start.log"

    echo "ceph-dev: pool rbd" >&2
    "${ceph[@]}" osd pool create rbd 8 8 >/dev/null 2>&1
    rbd -c "$conf" pool init rbd

    wait_healthy
}

case "$cmd" in
start) start ;;
stop)
    [[ -d $dir ]] || exit 0
    stop
    rm -rf "${dir:?}"/{mon,mgr,osd,run,log,ceph.conf,keyring,monmap}
    ;;
halt | resume)
    dir=$(cd "$dir" && pwd)
    "$cmd"
    ;;
restart)
    dir=$(cd "$dir" && pwd)
    halt
    resume
    ;;
*) usage ;;
esac
