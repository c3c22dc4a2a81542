#!/bin/bash
# Runs agent-guard's escape-relevant checks on an older kernel in a
# throwaway VM: Debian 12's own kernel (6.1: no cgroup/connect_unix, no
# recent BPF helpers) under qemu (TCG), booted into an initramfs that holds
# busybox, the release binaries and their libraries.
#
# Inside the guest, each check prints `vm: check NAME ok` or `vm: check NAME
# FAIL (...)`: the daemon starts with a small policy; the fence (an allowed
# and a refused TCP connect, a refused UDP send); children inherit the tag
# (fork); moving itself to the root cgroup does not free a tagged process;
# a grant opens a tool and revoking it closes it again; after the daemon
# stops, `audit verify` passes and `audit replay` holds every allowed and
# refused call. The script exits 1 if any check fails or the guest never
# reports `vm: done`.
#
# Usage (root, after `cargo xtask build --release`):
#   scripts/vm-old-kernel.sh
# Environment:
#   AGENT_GUARD_VM_CACHE     where the kernel package is kept
#                            (default /var/cache/agent-guard/vm)
#   AGENT_GUARD_VM_DOWNLOAD  1 (default): fetch the package with
#                            `apt-get download` when the cache has none;
#                            0: only use the cache
#   AGENT_GUARD_RELEASE_DIR  the binaries (default target/release)
# When the kernel package, qemu or busybox cannot be had, it prints one
# `SKIP: old-kernel VM: ...` line naming what is missing and exits 0; CI
# (.ci/run) shows that line. Work happens in a temporary directory, removed
# at exit; the VM powers itself off (and is killed after 900 s).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
B=${AGENT_GUARD_RELEASE_DIR:-$ROOT/target/release}
CACHE=${AGENT_GUARD_VM_CACHE:-/var/cache/agent-guard/vm}
DOWNLOAD=${AGENT_GUARD_VM_DOWNLOAD:-1}

skip() {
    echo "SKIP: old-kernel VM: $*"
    exit 0
}

for f in "$B/agent-guard" "$B/agent-guard-probe"; do
    if [ ! -x "$f" ]; then
        echo "vm-old-kernel: $f is missing; run \`cargo xtask build --release\` first" >&2
        exit 2
    fi
done

need() {
    command -v "$1" >/dev/null && return 0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null 2>&1 ||
        skip "$1 is missing and \`apt-get install $2\` failed"
}
need qemu-system-x86_64 qemu-system-x86
need cpio cpio
need gzip gzip
if [ ! -x /bin/busybox ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null 2>&1 ||
        skip "/bin/busybox is missing and \`apt-get install busybox-static\` failed"
fi

# The kernel package: the newest 6.1 image in the cache, else downloaded
# into it (the package linux-image-amd64 names the current one).
newest_deb() {
    ls "$CACHE"/linux-image-6.1.*-amd64_*_amd64.deb 2>/dev/null | sort -V | tail -n 1
}
DEB=$(newest_deb)
if [ -z "$DEB" ] && [ "$DOWNLOAD" = 1 ]; then
    mkdir -p "$CACHE"
    PKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6\.1/{print $2; exit}')
    if [ -n "$PKG" ]; then
        echo "vm-old-kernel: downloading $PKG into $CACHE"
        (cd "$CACHE" && apt-get download "$PKG" >/dev/null 2>&1) || true
    fi
    DEB=$(newest_deb)
fi
[ -n "$DEB" ] || skip "no Debian 6.1 kernel package: $CACHE/linux-image-6.1.*-amd64_*_amd64.deb is missing (download: ${DOWNLOAD}; \`apt-get download\` of the package linux-image-amd64 depends on failed or was off)"
echo "vm-old-kernel: kernel package $DEB"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
dpkg-deb -x "$DEB" k
VMLINUZ=$(ls k/boot/vmlinuz-* | head -n 1)

mkdir -p r/bin r/lib/x86_64-linux-gnu r/lib64 r/etc r/tmp r/proc r/sys r/dev r/run
cp /bin/busybox r/bin/
for c in sh mount mkdir sleep cat ip poweroff echo grep ls uname kill wc head; do ln -s busybox r/bin/$c; done
cp "$B/agent-guard" "$B/agent-guard-probe" r/bin/
for lib in $(ldd "$B/agent-guard" "$B/agent-guard-probe" | awk '/=>/{print $3} /ld-linux/{print $1}' | sort -u); do
    cp -L "$lib" "r$lib"
done
cat > r/etc/policy.toml <<'EOF'
default_mode = "enforce"
[[tenant]]
name = "acme"
[[tool]]
name = "search"
endpoints = [{ cidr = "127.0.0.1/32", port = 18081 }]
[[tool]]
name = "pay"
endpoints = [{ cidr = "127.0.0.1/32", port = 18083 }]
[[tool]]
name = "proxy"
endpoints = [{ unix = "/run/proxy.sock" }]
[[agent]]
tenant = "acme"
name = "researcher"
tools = ["search", "proxy"]
EOF
cat > r/init <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
echo "vm: kernel $(uname -r)"
# Nothing listens in the VM: a connect the fence lets through fails with
# ECONNREFUSED (probe exit 11), a refused one with EPERM (exit 10).
PASSED=11
REFUSED=10
check() {
    name=$1
    want=$2
    shift 2
    "$@" > /tmp/out 2>&1
    got=$?
    if [ "$got" = "$want" ]; then
        echo "vm: check $name ok"
    else
        echo "vm: check $name FAIL (exit $got, want $want): $*"
        head -n 5 /tmp/out
    fi
}
tagged() {
    /bin/agent-guard run --tenant acme --agent researcher -- /bin/agent-guard-probe "$@"
}
/bin/agent-guard doctor
/bin/agent-guard daemon --policy /etc/policy.toml --audit-dir /tmp/audit --state-dir /tmp/state > /tmp/daemon.log 2>&1 &
DAEMON=$!
i=0
while [ $i -lt 60 ]; do
    /bin/agent-guard status >/dev/null 2>&1 && break
    i=$((i + 1))
    sleep 0.5
done
check daemon-ready 0 /bin/agent-guard status
/bin/agent-guard status | grep -E "unix|programs|policy"
check fence-allowed-tcp $PASSED tagged tcp 127.0.0.1 18081
check fence-refused-tcp $REFUSED tagged tcp 127.0.0.1 18082
check fence-refused-udp $REFUSED tagged udp-send 127.0.0.1 18082
check untagged-unfenced $PASSED /bin/agent-guard-probe tcp 127.0.0.1 18082
check fork-inherits $REFUSED tagged fork tcp 127.0.0.1 18082
check cgroup-escape $REFUSED tagged escape-cgroup /sys/fs/cgroup tcp 127.0.0.1 18082
check before-grant $REFUSED tagged tcp 127.0.0.1 18083
GRANT=$(/bin/agent-guard grant --tenant acme --agent researcher --tool pay --ttl 5m 2>/tmp/grant.err)
check grant-made 0 test -n "$GRANT"
check granted $PASSED tagged tcp 127.0.0.1 18083
check revoke 0 /bin/agent-guard revoke --grant "$GRANT"
check revoked $REFUSED tagged tcp 127.0.0.1 18083
kill -TERM $DAEMON
wait $DAEMON
check daemon-stopped 0 test $? -eq 0
grep -E "WARN|ERROR" /tmp/daemon.log | head -n 5
check audit-verify 0 /bin/agent-guard audit verify --audit-dir /tmp/audit
# Six refused calls (tcp, udp, fork, escape, before grant, revoked) and
# two allowed ones (search, the grant) of the tagged agent.
DENIED=$(/bin/agent-guard audit replay --audit-dir /tmp/audit --tenant acme --verdict deny --json | wc -l)
ALLOWED=$(/bin/agent-guard audit replay --audit-dir /tmp/audit --tenant acme --verdict allow --json | grep -c '"kind":"connect"')
check audit-denied 0 test "$DENIED" -ge 6
check audit-allowed 0 test "$ALLOWED" -ge 2
echo "vm: audit: $DENIED refused, $ALLOWED allowed connects on record"
echo "vm: done"
poweroff -f
EOF
chmod +x r/init
(cd r && find . | cpio -o -H newc 2>/dev/null | gzip -1) > initrd.gz
# TCG, not KVM: under this nested-virtualised host a KVM guest hangs right
# after the kernel decompresses; emulation boots in seconds.
timeout 900 qemu-system-x86_64 -accel tcg -cpu max -m 2048 -smp 2 -nographic -no-reboot \
    -kernel "$VMLINUZ" -initrd initrd.gz -append "console=ttyS0 rdinit=/init quiet panic=-1" \
    | tr -d '\r' | grep -vE "^$|SeaBIOS|iPXE|Booting|Press Ctrl" | tee guest.log || true

ok=$(grep -c '^vm: check .* ok$' guest.log || true)
# The first line may follow the console's escape codes.
kernel=$(grep -o -m1 'vm: kernel .*' guest.log | sed 's/^vm: //' || true)
failed=$(grep -c '^vm: check .* FAIL' guest.log || true)
if ! grep -q '^vm: done' guest.log; then
    echo "vm-old-kernel: FAILED: the guest never reported 'vm: done' ($ok checks passed before)" >&2
    exit 1
fi
if [ "$failed" -ne 0 ] || [ "$ok" -eq 0 ]; then
    echo "vm-old-kernel: FAILED: $failed check(s) failed, $ok passed on ${kernel:-an unknown kernel}" >&2
    exit 1
fi
echo "vm-old-kernel: OK: $ok checks passed on ${kernel:-an unknown kernel}"
