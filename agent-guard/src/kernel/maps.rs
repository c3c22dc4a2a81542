//! Typed access to the kernel maps. No raw byte juggling outside this file.

use agent_guard_common::{
    Config,
    event::{kind, verdict},
    grant::{FIXED_PREFIX_BITS, GrantKey, GrantSlots, GrantState, GrantValue, ToolLimit},
    maps as names,
    subject::Subject,
    unix::UnixPath,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
};

use super::KernelError;

/// Takes map `name` out of the object as the typed map `T`.
pub(super) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> KernelError {
    move |source| {
        // A full hash map answers E2BIG, a full LPM trie ENOSPC.
        let full = matches!(&source, aya::maps::MapError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)));
        if full {
            KernelError::MapFull {
                name,
                capacity: capacity_of(name),
            }
        } else {
            KernelError::Map { name, source }
        }
    }
}

/// Capacities set at load (`--map-capacity`), for error messages and
/// metrics; the built-in default for the others.
static CAPACITIES: std::sync::OnceLock<Vec<(&'static str, u32)>> = std::sync::OnceLock::new();

/// Records the capacities the maps were loaded with (once per process).
pub(super) fn set_capacities(caps: Vec<(&'static str, u32)>) {
    let _ = CAPACITIES.set(caps);
}

/// The capacity map `name` was loaded with.
pub fn capacity_of(name: &str) -> u32 {
    if name == names::PROCS {
        return super::procs_capacity();
    }
    // Loaded with `CAPS`'s size (it holds a subset of it).
    let name = if name == names::CAPS_EXACT {
        names::CAPS
    } else {
        name
    };
    CAPACITIES
        .get()
        .and_then(|c| c.iter().find(|(n, _)| *n == name).map(|(_, v)| *v))
        .or_else(|| {
            super::SIZABLE_MAPS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
        })
        .unwrap_or(0)
}

/// A key of `CAPS` or `GRANTS`: subject, generation (0 in `GRANTS`),
/// protocol, port and address prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CapRule {
    pub subject: u32,
    pub generation: u8,
    pub proto: u8,
    pub port: u16,
    /// IPv6 bytes, IPv4 v4-mapped.
    pub addr: [u8; 16],
    /// Prefix length over the 128-bit address.
    pub prefix_len: u8,
}

impl CapRule {
    fn from_key(key: &Key<GrantKey>) -> Self {
        let d = key.data();
        Self {
            subject: u32::from_be_bytes(d.subject),
            generation: d.generation,
            proto: d.proto,
            port: u16::from_be_bytes(d.port),
            addr: d.addr,
            prefix_len: key.prefix_len().saturating_sub(FIXED_PREFIX_BITS) as u8,
        }
    }

    /// Does this key's prefix contain all of `other`'s (same subject,
    /// generation, protocol and port; a prefix no longer than `other`'s)?
    pub fn covers(&self, other: &CapRule) -> bool {
        if (self.subject, self.generation, self.proto, self.port)
            != (other.subject, other.generation, other.proto, other.port)
            || self.prefix_len > other.prefix_len
        {
            return false;
        }
        let a = u128::from_be_bytes(self.addr);
        let b = u128::from_be_bytes(other.addr);
        let mask = match self.prefix_len {
            0 => 0,
            n => u128::MAX << (128 - u32::from(n.min(128))),
        };
        a & mask == b & mask
    }

    /// One address (a /128, IPv4 /32 v4-mapped, or a Unix path id): the
    /// entry also goes into the exact-match fast path.
    pub fn is_exact(&self) -> bool {
        self.prefix_len == 128
    }

    fn key(&self) -> Key<GrantKey> {
        Key::new(
            FIXED_PREFIX_BITS + u32::from(self.prefix_len),
            GrantKey::new(
                self.subject,
                self.generation,
                self.proto,
                self.port,
                self.addr,
            ),
        )
    }
}

/// Handles to every map the daemon writes or reads.
pub struct KernelMaps {
    procs: HashMap<MapData, u32, u32>,
    cgroups: HashMap<MapData, u64, u32>,
    subjects: HashMap<MapData, u32, Subject>,
    caps: LpmTrie<MapData, GrantKey, GrantValue>,
    /// The full-length entries of `caps`, for a hash lookup first.
    caps_exact: HashMap<MapData, GrantKey, GrantValue>,
    grants: LpmTrie<MapData, GrantKey, GrantSlots>,
    grant_state: HashMap<MapData, u32, GrantState>,
    tools: HashMap<MapData, u32, ToolLimit>,
    config: Array<MapData, Config>,
    lost: PerCpuArray<MapData, u64>,
    decisions: PerCpuArray<MapData, u64>,
    unix_paths: HashMap<MapData, UnixPath, u32>,
    /// Where the Unix hooks find the address; `None` = not attached.
    unix_layout: Option<super::unix::Layout>,
    /// Port of the per-agent DNS proxy (0 = off), written into `CONFIG`.
    dns_proxy_port: u16,
    /// Until the daemon takes it for its event pipeline.
    flow_table: Option<super::flows::FlowTable>,
}

impl KernelMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        Ok(Self {
            procs: take(ebpf, names::PROCS)?,
            cgroups: take(ebpf, names::CGROUPS)?,
            subjects: take(ebpf, names::SUBJECTS)?,
            caps: take(ebpf, names::CAPS)?,
            caps_exact: take(ebpf, names::CAPS_EXACT)?,
            grants: take(ebpf, names::GRANTS)?,
            grant_state: take(ebpf, names::GRANT_STATE)?,
            tools: take(ebpf, names::TOOLS)?,
            config: take(ebpf, names::CONFIG)?,
            lost: take(ebpf, names::LOST)?,
            decisions: take(ebpf, names::DECISIONS)?,
            unix_paths: take(ebpf, names::UNIX_PATHS)?,
            unix_layout: None,
            dns_proxy_port: 0,
            flow_table: Some(super::flows::FlowTable::take(ebpf)?),
        })
    }

    /// The flow table (`--flow-records`), once.
    pub fn take_flow_table(&mut self) -> Option<super::flows::FlowTable> {
        self.flow_table.take()
    }

    pub fn tag_process(&mut self, tgid: u32, subject: u32) -> Result<(), KernelError> {
        self.procs
            .insert(tgid, subject, 0)
            .map_err(map_err(names::PROCS))
    }

    pub fn process_subject(&self, tgid: u32) -> Option<u32> {
        self.procs.get(&tgid, 0).ok()
    }

    /// All (tgid, subject) pairs; used for gauges and the stale sweep.
    pub fn processes(&self) -> Vec<(u32, u32)> {
        self.procs.iter().filter_map(Result::ok).collect()
    }

    pub fn untag_process(&mut self, tgid: u32) {
        // Already gone is fine: the exit tracepoint may have removed it.
        let _ = self.procs.remove(&tgid);
    }

    pub fn tag_cgroup(&mut self, cgroup_id: u64, subject: u32) -> Result<(), KernelError> {
        self.cgroups
            .insert(cgroup_id, subject, 0)
            .map_err(map_err(names::CGROUPS))
    }

    pub fn cgroup_subject(&self, cgroup_id: u64) -> Option<u32> {
        self.cgroups.get(&cgroup_id, 0).ok()
    }

    pub fn set_subject(&mut self, id: u32, subject: Subject) -> Result<(), KernelError> {
        self.subjects
            .insert(id, subject, 0)
            .map_err(map_err(names::SUBJECTS))
    }

    pub fn remove_subject(&mut self, id: u32) -> Result<(), KernelError> {
        self.subjects.remove(&id).map_err(map_err(names::SUBJECTS))
    }

    pub fn untag_cgroup(&mut self, cgroup_id: u64) {
        let _ = self.cgroups.remove(&cgroup_id);
    }

    pub fn subject(&self, id: u32) -> Option<Subject> {
        self.subjects.get(&id, 0).ok()
    }

    /// Writes a base capability: into `CAPS`, then (one address, one
    /// port) into `CAPS_EXACT`, the programs' fast path. Only `CAPS`
    /// can refuse it: a full `CAPS_EXACT` leaves the entry to the trie.
    pub fn insert_cap(&mut self, rule: &CapRule, value: GrantValue) -> Result<(), KernelError> {
        let key = rule.key();
        self.caps
            .insert(&key, value, 0)
            .map_err(map_err(names::CAPS))?;
        if rule.is_exact()
            && let Err(e) = self.caps_exact.insert(key.data(), value, 0)
        {
            // An older value under this key must not outlive the new one.
            let _ = self.caps_exact.remove(&key.data());
            tracing::debug!("CAPS_EXACT: {e}; the entry is looked up in CAPS");
        }
        Ok(())
    }

    /// Removes a base capability: from `CAPS_EXACT` first, so the fast
    /// path never holds what `CAPS` no longer does.
    pub fn remove_cap(&mut self, rule: &CapRule) {
        let key = rule.key();
        let _ = self.caps_exact.remove(&key.data());
        let _ = self.caps.remove(&key);
    }

    pub fn insert_grant(&mut self, rule: &CapRule, slots: GrantSlots) -> Result<(), KernelError> {
        self.grants
            .insert(&rule.key(), slots, 0)
            .map_err(map_err(names::GRANTS))
    }

    pub fn remove_grant(&mut self, rule: &CapRule) {
        let _ = self.grants.remove(&rule.key());
    }

    /// The grants the kernel holds at exactly `rule`'s key.
    pub fn grant_slots(&self, rule: &CapRule) -> Option<GrantSlots> {
        self.grants.get(&rule.key(), 0).ok()
    }

    /// Every `GRANTS` key with its slots, as the kernel has them.
    pub fn grant_entries(&self) -> Vec<(CapRule, GrantSlots)> {
        self.grants
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (CapRule::from_key(&k), v))
            .collect()
    }

    pub fn set_grant_state(&mut self, id: u32, state: GrantState) -> Result<(), KernelError> {
        self.grant_state
            .insert(id, state, 0)
            .map_err(map_err(names::GRANT_STATE))
    }

    pub fn grant_state(&self, id: u32) -> Option<GrantState> {
        self.grant_state.get(&id, 0).ok()
    }

    pub fn remove_grant_state(&mut self, id: u32) {
        let _ = self.grant_state.remove(&id);
    }

    pub fn tool_limit(&self, tool_id: u32) -> Option<ToolLimit> {
        self.tools.get(&tool_id, 0).ok()
    }

    pub fn set_tool_limit(
        &mut self,
        tool_id: u32,
        limit: Option<ToolLimit>,
    ) -> Result<(), KernelError> {
        match limit {
            Some(l) => self
                .tools
                .insert(tool_id, l, 0)
                .map_err(map_err(names::TOOLS)),
            None => {
                let _ = self.tools.remove(&tool_id);
                Ok(())
            }
        }
    }

    /// Writes `CONFIG[0]`; the Unix hook offsets are filled in here.
    pub fn set_config(&mut self, mut config: Config) -> Result<(), KernelError> {
        let (a, l) = self.unix_layout.map_or(
            (
                agent_guard_common::UNIX_OFFSETS_UNKNOWN,
                agent_guard_common::UNIX_OFFSETS_UNKNOWN,
            ),
            |l| (l.uaddr_off, l.uaddrlen_off),
        );
        config.unix_uaddr_off = a;
        config.unix_uaddrlen_off = l;
        config.dns_proxy_port = u32::from(self.dns_proxy_port);
        self.config
            .set(0, config, 0)
            .map_err(map_err(names::CONFIG))
    }

    /// Turns per-agent DNS redirection on (port) or off (0) with the next
    /// `set_config`.
    pub fn set_dns_proxy_port(&mut self, port: u16) {
        self.dns_proxy_port = port;
    }

    pub(super) fn set_unix_layout(&mut self, layout: Option<super::unix::Layout>) {
        self.unix_layout = layout;
    }

    /// Maps a Unix socket address (as [`UnixPath::new`] takes it) to a
    /// path id.
    pub fn insert_unix_path(&mut self, path: &UnixPath, id: u32) -> Result<(), KernelError> {
        self.unix_paths
            .insert(path, id, 0)
            .map_err(map_err(names::UNIX_PATHS))
    }

    pub fn remove_unix_path(&mut self, path: &UnixPath) {
        let _ = self.unix_paths.remove(path);
    }

    /// Records lost per kind, summed over CPUs.
    pub fn lost(&self) -> [u64; kind::COUNT as usize] {
        sum_per_cpu(&self.lost)
    }

    /// Decisions per verdict, summed over CPUs.
    pub fn decisions(&self) -> [u64; verdict::COUNT as usize] {
        sum_per_cpu(&self.decisions)
    }

    /// Entry counts for `agent_guard_map_entries{map}`.
    pub fn entry_counts(&self) -> [(&'static str, usize); 8] {
        [
            (names::PROCS, self.procs.keys().count()),
            (names::CGROUPS, self.cgroups.keys().count()),
            (names::SUBJECTS, self.subjects.keys().count()),
            (names::CAPS, self.caps.keys().count()),
            (names::CAPS_EXACT, self.caps_exact.keys().count()),
            (names::GRANTS, self.grants.keys().count()),
            (names::GRANT_STATE, self.grant_state.keys().count()),
            (names::UNIX_PATHS, self.unix_paths.keys().count()),
        ]
    }
}

fn sum_per_cpu<const N: usize>(array: &PerCpuArray<MapData, u64>) -> [u64; N] {
    let mut out = [0u64; N];
    for (i, slot) in out.iter_mut().enumerate() {
        if let Ok(values) = array.get(&(i as u32), 0) {
            *slot = values.iter().sum();
        }
    }
    out
}
