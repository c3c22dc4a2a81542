#!/usr/bin/env bash
# Runs the DaemonSet's container on this host the way a kubelet and a CRI
# runtime would set it up, as far as one host without a container runtime
# can, then launches an agent from an emulated agent pod. Called by
# validate.py (which writes WORK/command.sh, args, caps, pod-uid, pod-groups,
# agent, deny, etc/policy.toml, issuer.key from the manifests); root only.
#
#   bash deploy/kubernetes/emulate-node.sh WORK AGENT_GUARD_BINARY
#
# The daemon's container gets: its own mount, network and cgroup namespaces
# (a non-privileged container on cgroup v2 gets its own cgroup namespace),
# the host's pid namespace (hostPID), a fresh read-only sysfs with the
# runtime's read-only namespaced cgroup2 view at /sys/fs/cgroup, then the
# hostPath volumes on top (the node's cgroup2 at /sys/fs/cgroup, a stand-in
# for the node's bpffs at /sys/fs/bpf), a read-only root filesystem, and
# only the manifest's capabilities (bounding set). Then the manifest's own
# command script runs with the manifest's args (paths of non-/sys volumes
# mapped into WORK). Prints `ok`/`note`/`FAIL` lines; exit 1 on a failure.
set -uo pipefail

W=$1
BIN=$2
LOG=$W/emulate.log
: >"$LOG"
exec 3>&1 >>"$LOG" 2>&1
say() { echo "$*" >&3; }
failed=0
bad() { say "FAIL     node emulation: $*"; failed=1; }

CG2=$(findmnt -n -t cgroup2 -o TARGET | head -n1)
if [ -z "$CG2" ]; then
    say "SKIPPED  node emulation (no cgroup2 mounted here)"
    exit 0
fi
ID=agent-guard-validate-$$
CG=$CG2/$ID
DAEMON_PID=
REF_PID=

# shellcheck disable=SC2317  # (run by the EXIT trap)
cleanup() {
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        for _ in $(seq 1 40); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$DAEMON_PID" 2>/dev/null
    fi
    [ -n "$REF_PID" ] && kill "$REF_PID" 2>/dev/null
    umount -l "$W/node-bpf" 2>/dev/null
    # Children first: agent cgroups the daemon left, then the pod cgroups.
    for d in "$CG-agents" "$CG"; do
        [ -d "$d" ] || continue
        find "$d" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null
        rmdir "$d" 2>/dev/null
    done
}
trap cleanup EXIT

mapfile -t ARGS <"$W/args"
# Agent cgroups in a directory of this run, not <cgroup2>/agent-guard, which
# a real daemon on this machine may be using; like that one, directly under
# the cgroup2 root (mode 0555: creating it takes CAP_DAC_OVERRIDE). The path
# is the container's: the node's cgroup2 is mounted at /sys/fs/cgroup there.
ARGS+=("--cgroup-root=/sys/fs/cgroup/$ID-agents")
CAPS=$(tr '[:upper:]' '[:lower:]' <"$W/caps" | tr -d '\n' | sed 's/[a-z_][a-z_]*/+&/g')
POD_UID=$(cat "$W/pod-uid")
POD_GROUPS=$(cat "$W/pod-groups")
read -r TENANT AGENT <"$W/agent"
SOCKET=
for a in "${ARGS[@]}"; do case $a in --socket=*) SOCKET=${a#--socket=} ;; esac; done

mkdir -p "$CG/daemon-pod" "$CG/agent-pod" "$W/node-bpf"
chmod 0755 "$W"
mount -t bpf bpffs "$W/node-bpf" || { bad "cannot mount a bpffs stand-in"; exit 1; }

# hostPID makes /proc/1 the node's init. This sandbox's pid 1 refuses even
# root a look at its namespaces; a process of ours in the host's cgroup
# namespace then stands in for it.
SCRIPT=$(cat "$W/command.sh")
if ! readlink /proc/1/ns/cgroup >/dev/null 2>&1; then
    sleep 600 &
    REF_PID=$!
    SCRIPT=${SCRIPT//\/proc\/1\/ns\/cgroup//proc/$REF_PID/ns/cgroup}
    say "note     node emulation: /proc/1/ns/cgroup is unreadable here; pid $REF_PID (host cgroup namespace) stands in for the node's init"
fi
printf '%s\n' "$SCRIPT" >"$W/command-run.sh"

# The container. `unshare` runs in the daemon pod's cgroup, so the new
# cgroup namespace is rooted there, as the runtime's would be.
(
    echo $BASHPID >"$CG/daemon-pod/cgroup.procs"
    # shellcheck disable=SC2016  # expanded by the inner bash
    exec unshare --mount --net --cgroup --propagation private bash -c '
        set -e
        W=$1 CG2=$2 CAPS=$3 BIN=$4; shift 4
        mkdir -p "$W/hostcg"
        mount --rbind "$CG2" "$W/hostcg"
        umount -l /sys
        mount -t sysfs -o ro sysfs /sys
        mount -t cgroup2 -o ro cgroup2 /sys/fs/cgroup
        mount --rbind "$W/hostcg" /sys/fs/cgroup
        umount -l "$W/hostcg"
        mount --bind "$W/node-bpf" /sys/fs/bpf
        mount --bind "$W" "$W"
        # The image puts the binary at /usr/local/bin/agent-guard.
        mount -t tmpfs -o mode=0755 image-usr-local-bin /usr/local/bin
        touch /usr/local/bin/agent-guard
        mount --bind "$BIN" /usr/local/bin/agent-guard
        mount -o remount,bind,ro /
        ip link set lo up 2>/dev/null || true
        exec setpriv --bounding-set=-all,"$CAPS" --inh-caps=-all -- \
            /bin/sh -c "$(cat "$W/command-run.sh")" agent-guard "$@"
    ' emulate "$W" "$CG2" "$CAPS" "$BIN" "${ARGS[@]}"
) >"$W/daemon.log" 2>&1 &
DAEMON_PID=$!

ready=0
for _ in $(seq 1 120); do
    grep -q "daemon ready" "$W/daemon.log" 2>/dev/null && { ready=1; break; }
    kill -0 "$DAEMON_PID" 2>/dev/null || break
    sleep 0.25
done
if [ "$ready" != 1 ]; then
    bad "the daemon did not start in the emulated container; its log ($W/daemon.log) ends:"
    tail -n 5 "$W/daemon.log" >&3
    exit 1
fi
say "ok       node emulation: daemon: started as the DaemonSet's container (own mount/net/cgroup namespaces, read-only root and sysfs, capabilities $(tr -d '\n' <"$W/caps") only), joined the node's cgroup namespace, programs attached"

# Probes and metrics, from inside the pod's network namespace.
probe() {
    nsenter --net=/proc/$DAEMON_PID/ns/net /usr/bin/python3 -c '
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen("http://127.0.0.1:9753" + sys.argv[1], timeout=5)
    body = r.read().decode()
    print(r.status, "agent_guard_build_info" in body)
except urllib.error.HTTPError as e:
    print(e.code, False)
except Exception as e:
    print("error", e)
' "$1"
}
m=$(probe /metrics)
case $m in
    "200 True") say "ok       node emulation: metrics: GET /metrics on 0.0.0.0:9753 answers inside the pod's network namespace" ;;
    *) bad "GET /metrics: $m" ;;
esac
for p in /healthz /readyz; do
    r=$(probe "$p")
    case $r in
        200*) say "ok       node emulation: probe $p answers 200" ;;
        404*) say "SKIPPED  node emulation: probe $p (this build of the daemon has no $p yet: 404)" ;;
        *) bad "probe $p: $r" ;;
    esac
done

# An agent pod: its own pid, network and mount namespaces, a non-root user
# in the control group (the README's example pod), a token for this node.
launch() { # $1: name, $2: extra unshare flags; runs in the agent pod's cgroup
    local tok=$W/$1.jwt
    "$BIN" token issue --key "$W/issuer.key" --tenant "$TENANT" --agent "$AGENT" \
        --ttl 5m --valid-for 2m --aud emulated-node >"$tok" || return 99
    chmod 0644 "$tok"
    local addr port
    read -r addr port <"$W/deny"
    (
        echo $BASHPID >"$CG/agent-pod/cgroup.procs"
        # shellcheck disable=SC2086,SC2016  # $2: flags; the rest expands inside
        exec unshare $2 --pid --fork --net --mount-proc /bin/bash -c '
            ip link set lo up 2>/dev/null
            # The socket directory as the pod mounts it: read-only.
            d=$(dirname "$4"); mount --bind "$d" "$d"; mount -o remount,bind,ro "$d"
            exec setpriv --reuid="$1" --regid="$1" --groups="$2" -- "$3" run --socket "$4" --token "$5" -- \
                /bin/bash -c "(exec 3<>/dev/tcp/$6/$7) 2>/dev/null; exit 0"
        ' pod "$POD_UID" "$POD_GROUPS" "$BIN" "$SOCKET" "$tok" "$addr" "$port"
    ) >"$W/$1.log" 2>&1
}
audit_lines() { cat "$W"/vol-*/audit/"$TENANT"/audit.jsonl 2>/dev/null; }
seen=$(audit_lines | wc -l)
launch host-cgroupns ""
rc=$?
read -r addr port <"$W/deny"
# The daemon drains the kernel's ring and flushes the trail every 20 ms.
found=0
for _ in $(seq 1 50); do
    if audit_lines | tail -n +$((seen + 1)) | grep -q "\"uid\":$POD_UID,.*\"dst\":\"$addr\",\"port\":$port,.*\"verdict\":\"\(would_deny\|deny\)\""; then
        found=1
        break
    fi
    sleep 0.1
done
if [ "$found" = 1 ]; then
    say "ok       node emulation: agent pod: uid $POD_UID in group $POD_GROUPS launched $TENANT/$AGENT with a token through the socket's host directory; its connect to $addr:$port from the pod's network namespace is in the audit trail as refused (exit $rc)"
else
    bad "agent pod launch (exit $rc): no refused connect of uid $POD_UID to $addr:$port in the audit trail; launcher said: $(tr '\n' ' ' <"$W/host-cgroupns.log")"
fi

# The same from a pod with its own cgroup namespace, as every container
# that is not privileged gets on cgroup v2.
launch own-cgroupns "--cgroup"
rc=$?
if [ "$rc" = 0 ]; then
    say "ok       node emulation: agent pod with its own cgroup namespace: launched"
elif grep -q "could not confirm that this process is fenced" "$W/own-cgroupns.log"; then
    say "note     node emulation: agent pod with its own cgroup namespace: refused (exit $rc): $(head -n1 "$W/own-cgroupns.log") -- known issue, see deploy/kubernetes/README.md"
else
    say "note     node emulation: agent pod with its own cgroup namespace: refused (exit $rc): $(head -n1 "$W/own-cgroupns.log")"
fi

# A clean stop on SIGTERM, as the kubelet sends it.
kill -TERM "$DAEMON_PID"
for _ in $(seq 1 80); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.25; done
if kill -0 "$DAEMON_PID" 2>/dev/null; then
    bad "the daemon did not stop within 20 s of SIGTERM"
else
    wait "$DAEMON_PID"
    st=$?
    if [ "$st" = 0 ]; then
        say "ok       node emulation: stop: SIGTERM, exit 0"
    else
        bad "the daemon exited $st after SIGTERM; log: $W/daemon.log"
    fi
fi
DAEMON_PID=
exit $failed
