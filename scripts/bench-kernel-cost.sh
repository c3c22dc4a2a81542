#!/bin/bash
# In-kernel cost per connect() of agent-guard's programs, from the kernel's
# own per-program run statistics (kernel.bpf_stats_enabled=1).
# Usage (root, after `cargo xtask build --release`): scripts/bench-kernel-cost.sh
#   AG_DAEMON_FLAGS="--flow-records" scripts/bench-kernel-cost.sh   # flow mode
#   AG_BIN_DIR=target/debug ...   # other binaries (the eBPF object is always release)
# Works in a temporary directory, listens on 127.0.0.1:18099, and stops what
# it started by PID.
set -u
B=${AG_BIN_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
B=$(cd "$B" && pwd)
WORK=$(mktemp -d)
cd "$WORK"
trap 'echo 0 > /proc/sys/kernel/bpf_stats_enabled; rm -rf "$WORK"' EXIT
CG=$(awk '$9=="cgroup2"{print $5; exit}' /proc/self/mountinfo)
python3 - <<'PY' > policy.toml
print('default_mode = "enforce"\n[[tenant]]\nname = "bench"')
tools = []
for t in range(10):
    eps = ",\n".join(f'  {{ cidr = "10.{t}.{i//250}.{i%250}/32", port = {1000 + i % 50000} }}' for i in range(1000))
    print(f'[[tool]]\nname = "t{t}"\nendpoints = [\n{eps}\n]')
    tools.append(f'"t{t}"')
print('[[tool]]\nname = "l"\nendpoints = [{ cidr = "127.0.0.1/32", port = 18099 }]')
print(f'[[agent]]\ntenant = "bench"\nname = "a"\ntools = [{", ".join(tools)}, "l"]')
PY
python3 -c '
import socket,threading
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1",18099)); s.listen(4096)
def acc():
    while True:
        c,_=s.accept(); c.close()
for _ in range(2): threading.Thread(target=acc,daemon=True).start()
import time; time.sleep(600)' & LPID=$!
$B/agent-guard daemon --policy $PWD/policy.toml --socket $PWD/s --pin-dir $PWD/bpf --audit-dir $PWD/audit --state-dir $PWD/state --cgroup-root $CG/ag-bs --metrics-addr 127.0.0.1:0 ${AG_DAEMON_FLAGS:-} > d.log 2>&1 & DPID=$!
for i in $(seq 100); do $B/agent-guard status --socket $PWD/s >/dev/null 2>&1 && break; sleep 0.1; done
stat() { $B/agent-guard status --socket $PWD/s --json | python3 -c 'import json,sys; d=json.load(sys.stdin)["program_stats"]["connect4"]; print(d["run_count"], d["run_time_ns"])'; }
echo 1 > /proc/sys/kernel/bpf_stats_enabled
N=5000
for round in 1 2 3; do
  read c0 t0 < <(stat)
  $B/agent-guard-probe bench-connect 127.0.0.1 18099 $N > untagged.out
  read c1 t1 < <(stat)
  sleep 2
  $B/agent-guard run --socket $PWD/s --tenant bench --agent a -- $B/agent-guard-probe bench-connect 127.0.0.1 18099 $N > tagged.out
  read c2 t2 < <(stat)
  sleep 2
  echo "round $round: untagged $(( (t1-t0)/(c1-c0) )) ns/call over $((c1-c0)) calls (connect $(cut -d' ' -f1 untagged.out) ns); tagged+10k entries $(( (t2-t1)/(c2-c1) )) ns/call over $((c2-c1)) calls (connect $(cut -d' ' -f1 tagged.out) ns)"
done
echo 0 > /proc/sys/kernel/bpf_stats_enabled
kill -TERM $DPID; wait $DPID; kill $LPID
