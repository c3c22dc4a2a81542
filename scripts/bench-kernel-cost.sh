#!/bin/bash
# In-kernel cost per call of agent-guard's programs, from the kernel's own
# per-program run statistics (kernel.bpf_stats_enabled=1): TCP connect, UDP
# sendto and Unix connect; untagged, tagged with 10,000 endpoints one record
# per call, and tagged with --flow-records.
#
# This is part 7 of `cargo xtask bench` without its timed rounds; the bench
# builds the release binaries itself, works in a temporary directory, and
# stops what it started by PID. Extra arguments go to `cargo xtask bench`.
# Usage (root): scripts/bench-kernel-cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo xtask bench --only cost --cost-rounds 0 "$@"
