//! The flow table of `--flow-records` mode: typed access to `FLOWS`,
//! `FLOW_CONFIG` and `FLOW_FALLBACKS`, and the epoch flip that lets the
//! daemon read a flow table the programs still write.
//!
//! Programs count a call under `FLOW_CONFIG.epoch`. To collect, the daemon
//! flips the epoch and then waits for an RCU grace period: cgroup sock_addr
//! programs run inside `rcu_read_lock()` (`bpf_prog_run_array_cg`), so once
//! a grace period has passed no program still holds the old epoch or a
//! pointer to an old-epoch value. Only then are the old keys read and
//! deleted; nothing counted can be missed or counted twice.

use agent_guard_common::{
    flow::{FlowConfig, FlowKey, FlowStats, fallback},
    maps as names,
};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, PerCpuHashMap},
};
use thiserror::Error;

use super::{KernelError, maps::take};

#[derive(Debug, Error)]
pub enum FlowError {
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "waiting for an RCU grace period (membarrier(MEMBARRIER_CMD_GLOBAL)) failed: {0}; flow records need it (a nohz_full kernel refuses it)"
    )]
    GracePeriod(std::io::Error),
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> FlowError {
    move |source| FlowError::Map { name, source }
}

/// One flow of a collected epoch, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub key: FlowKey,
    pub calls: u64,
    /// Kernel monotonic ns of the first and last call.
    pub first_ns: u64,
    pub last_ns: u64,
    pub cgroup_id: u64,
    pub uid: u32,
}

impl Flow {
    /// Sums one key's per-CPU values; `None` when no CPU counted a call.
    pub fn sum(key: FlowKey, per_cpu: impl IntoIterator<Item = FlowStats>) -> Option<Flow> {
        let mut flow: Option<Flow> = None;
        for v in per_cpu.into_iter().filter(|v| v.calls > 0) {
            let f = flow.get_or_insert(Flow {
                key,
                calls: 0,
                first_ns: v.first_ns,
                last_ns: v.last_ns,
                cgroup_id: v.cgroup_id,
                uid: v.uid,
            });
            f.calls += v.calls;
            if v.first_ns < f.first_ns {
                (f.first_ns, f.cgroup_id, f.uid) = (v.first_ns, v.cgroup_id, v.uid);
            }
            f.last_ns = f.last_ns.max(v.last_ns);
        }
        flow
    }
}

/// Waits until every BPF program that was running when this was called has
/// finished. `membarrier(MEMBARRIER_CMD_GLOBAL)` calls `synchronize_rcu()`
/// in kernel/membarrier.c (6.x) whenever more than one CPU is online; with
/// one CPU it returns at once, which is a grace period only on kernels
/// without preemptible RCU, so there we also yield the CPU a few times to
/// let a preempted program finish.
pub fn grace_period() -> Result<(), FlowError> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0) };
    if r != 0 {
        return Err(FlowError::GracePeriod(std::io::Error::last_os_error()));
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) == 1 {
        for _ in 0..4 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    Ok(())
}

/// `FLOWS`, `FLOW_CONFIG` and `FLOW_FALLBACKS` of one loaded object (or a
/// predecessor's pinned ones).
pub struct FlowTable {
    flows: PerCpuHashMap<MapData, FlowKey, FlowStats>,
    config: Array<MapData, FlowConfig>,
    fallbacks: PerCpuArray<MapData, u64>,
    /// What `FLOW_CONFIG[0]` holds (only this handle writes it).
    current: FlowConfig,
}

impl FlowTable {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        Ok(Self {
            flows: take(ebpf, names::FLOWS)?,
            config: take(ebpf, names::FLOW_CONFIG)?,
            fallbacks: take(ebpf, names::FLOW_FALLBACKS)?,
            current: FlowConfig::default(),
        })
    }

    /// Opens a predecessor's pinned `FLOWS` (takeover); the other maps are
    /// not needed to drain it once its programs are detached.
    pub fn pinned_flows(
        path: &std::path::Path,
    ) -> Option<PerCpuHashMap<MapData, FlowKey, FlowStats>> {
        let data = MapData::from_pin(path).ok()?;
        PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data)).ok()
    }

    fn write_config(&mut self, cfg: FlowConfig) -> Result<(), FlowError> {
        self.config
            .set(0, cfg, 0)
            .map_err(map_err(names::FLOW_CONFIG))?;
        self.current = cfg;
        Ok(())
    }

    /// Turns flow mode on or off for calls judged from now on.
    pub fn set_enabled(&mut self, on: bool) -> Result<(), FlowError> {
        self.write_config(FlowConfig {
            enabled: u32::from(on),
            ..self.current
        })
    }

    pub fn enabled(&self) -> bool {
        self.current.enabled != 0
    }

    /// Flips the epoch, waits for a grace period, then reads and deletes
    /// every flow of the old epoch.
    pub fn collect(&mut self) -> Result<Vec<Flow>, FlowError> {
        let old = self.current.epoch & 1;
        self.write_config(FlowConfig {
            epoch: old ^ 1,
            ..self.current
        })?;
        grace_period()?;
        Ok(drain(&mut self.flows, Some(old as u8)))
    }

    /// Turns flow mode off (calls go to the ring again), waits for a grace
    /// period and takes every flow of both epochs: nothing stays behind at
    /// shutdown.
    pub fn collect_all(&mut self) -> Result<Vec<Flow>, FlowError> {
        self.set_enabled(false)?;
        grace_period()?;
        Ok(drain(&mut self.flows, None))
    }

    /// Flows in the table now, both epochs.
    pub fn entries(&self) -> usize {
        self.flows.keys().count()
    }

    /// Calls recorded per call because the table was full, since load.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
            .get(&fallback::TABLE_FULL, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}

/// Reads and deletes the flows of `epoch` (every flow with `None`) from a
/// table no program writes under that epoch any more.
pub fn drain(
    flows: &mut PerCpuHashMap<MapData, FlowKey, FlowStats>,
    epoch: Option<u8>,
) -> Vec<Flow> {
    let keys: Vec<FlowKey> = flows
        .keys()
        .filter_map(Result::ok)
        .filter(|k| epoch.is_none_or(|e| k.epoch == e))
        .collect();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let per_cpu = flows.get(&key, 0);
        let _ = flows.remove(&key);
        if let Ok(values) = per_cpu
            && let Some(flow) = Flow::sum(key, values.iter().copied())
        {
            out.push(flow);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(calls: u64, first_ns: u64, last_ns: u64, uid: u32) -> FlowStats {
        FlowStats {
            calls,
            first_ns,
            last_ns,
            cgroup_id: u64::from(uid) + 100,
            uid,
            _pad: 0,
        }
    }

    #[test]
    fn per_cpu_values_sum_with_the_earliest_first_and_latest_last_call() {
        let key = FlowKey::default();
        let f = Flow::sum(
            key,
            [
                stats(3, 50, 90, 1),
                FlowStats::default(),
                stats(2, 20, 70, 2),
            ],
        )
        .expect("a flow");
        assert_eq!((f.calls, f.first_ns, f.last_ns), (5, 20, 90));
        assert_eq!((f.uid, f.cgroup_id), (2, 102));
        assert_eq!(Flow::sum(key, [FlowStats::default()]), None);
    }
}
