#!/bin/bash
# Runs agent-guard on an older kernel in a throwaway VM: Debian 12's
# linux-image-amd64 (6.1, no cgroup/connect_unix) under qemu/KVM, booted
# into an initramfs that holds busybox, the release binaries and their
# libraries. Inside: doctor, the daemon with a small policy, status, and
# tagged connects (one allowed, one refused) on the VM's loopback.
#
# Usage (root, after `cargo xtask build --release`):
#   scripts/vm-old-kernel.sh            # downloads the kernel package with apt
# Needs /dev/kvm and the Debian packages qemu-system-x86 and busybox-static
# (installed with apt when missing), and cpio. Works in a temporary directory,
# removed at exit; the VM powers itself off (and is killed after 600 s).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
B=$ROOT/target/release
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

need() { command -v "$1" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null; }
need qemu-system-x86_64 qemu-system-x86
need cpio cpio
[ -x /bin/busybox ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null

# The newest 6.1 image Debian 12 ships (the package linux-image-amd64 names it).
PKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6/{print $2; exit}')
apt-get download "$PKG" >/dev/null 2>&1
dpkg-deb -x "$PKG"_*.deb k
VMLINUZ=$(ls k/boot/vmlinuz-*)

mkdir -p r/bin r/lib/x86_64-linux-gnu r/lib64 r/etc r/tmp r/proc r/sys r/dev r/run
cp /bin/busybox r/bin/
for c in sh mount mkdir sleep cat ip poweroff echo grep ls uname; do ln -s busybox r/bin/$c; done
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
/bin/agent-guard doctor
/bin/agent-guard daemon --policy /etc/policy.toml --audit-dir /tmp/audit --state-dir /tmp/state > /tmp/daemon.log 2>&1 &
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    /bin/agent-guard status >/dev/null 2>&1 && break; sleep 0.5
done
/bin/agent-guard status | grep -E "unix|programs|policy"
# Nothing listens in the VM: a connect the fence lets through fails with
# ECONNREFUSED (probe exit 11), a refused one with EPERM (exit 10).
/bin/agent-guard run --tenant acme --agent researcher -- /bin/agent-guard-probe tcp 127.0.0.1 18081; echo "vm: allowed connect exit $? (11 = got past the fence)"
/bin/agent-guard run --tenant acme --agent researcher -- /bin/agent-guard-probe tcp 127.0.0.1 18082; echo "vm: refused connect exit $? (10 = EPERM from the fence)"
grep -E "WARN|ERROR" /tmp/daemon.log | head -5
echo "vm: done"
poweroff -f
EOF
chmod +x r/init
(cd r && find . | cpio -o -H newc 2>/dev/null | gzip -1) > initrd.gz
# TCG, not KVM: under this nested-virtualised host a KVM guest hangs right
# after the kernel decompresses; emulation boots in seconds.
timeout 600 qemu-system-x86_64 -accel tcg -cpu max -m 2048 -smp 2 -nographic -no-reboot \
    -kernel "$VMLINUZ" -initrd initrd.gz -append "console=ttyS0 rdinit=/init quiet panic=-1" \
    | tr -d '\r' | grep -vE "^$|SeaBIOS|iPXE|Booting|Press Ctrl" || true
