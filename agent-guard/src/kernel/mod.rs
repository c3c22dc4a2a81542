//! Loading, attaching and owning the eBPF programs and maps.
//!
//! One [`Kernel`] per daemon instance. Programs sit at the cgroup2 root so
//! every process on the node is covered, whichever cgroup its sockets were
//! created in. Dropping the [`Kernel`] detaches everything it attached.

pub mod btf;
pub mod flows;
pub mod fs;
pub mod maps;
pub mod sockdiag;
pub mod tracefs;
pub mod unix;

use std::{fs::File, os::fd::AsFd, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, TracePoint},
};
use thiserror::Error;

pub use maps::KernelMaps;

/// The eBPF object, embedded at build time (see build.rs).
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-guard-ebpf.o"));

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("this binary was built without its eBPF object; build it with `cargo xtask build`")]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error(
        "kernel map {name} is full ({capacity} entries); nothing was changed for this request (size it with `agent-guard daemon --map-capacity {name}=N`)"
    )]
    MapFull { name: &'static str, capacity: u32 },
    #[error("opening cgroup2 root {path}: {source}")]
    CgroupRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning at {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("pinning at {path}: {source}")]
    PinIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Fs(#[from] fs::FsError),
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
}

/// Whether tagged processes' Unix socket calls are fenced on this kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixSupport {
    /// `cgroup/connect_unix` and `cgroup/sendmsg_unix` are attached.
    Enforced,
    /// Not attached, and why (kernel before 6.7, no BTF, load refused).
    Unavailable(String),
}

/// The cgroup socket programs: (name in the object, what it guards).
/// recvmsg4/6 only restore the source of per-agent DNS proxy replies.
pub const CGROUP_PROGRAMS: &[&str] = &[
    "connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6",
];
/// Attached only with `--dns-mode per-agent`.
pub const RECVMSG_PROGRAMS: &[&str] = &["recvmsg4", "recvmsg6"];
/// The sched tracepoints that keep identity across fork, exec and exit.
pub const TRACEPOINTS: &[&str] = &[
    "sched_process_fork",
    "sched_process_exec",
    "sched_process_exit",
];

/// The event ring buffer, as the daemon reads it.
pub type Ring = aya::maps::RingBuf<aya::maps::MapData>;

/// Loaded and attached programs plus the daemon's handles to the maps.
pub struct Kernel {
    /// Owns the programs and their links; dropping it detaches them.
    _ebpf: Ebpf,
    /// Every link, pinned under `<pin-dir>/links-<pid>/`: if the daemon dies
    /// without shutting down (killed, crashed), the programs stay attached
    /// and the kernel keeps enforcing the last state (grant and task
    /// expiry included) until a new daemon takes over. [`Kernel::release`]
    /// removes the pins at a clean shutdown.
    pins: Pins,
    /// Set by [`Kernel::keep_attached`].
    keep: bool,
    /// The Unix socket hooks, when this kernel has them.
    _unix: Option<unix::UnixHooks>,
    pub unix: UnixSupport,
    pub attached: Vec<String>,
    /// (name, kernel program id) of every loaded program, for run stats.
    pub program_ids: Vec<(String, u32)>,
}

impl Kernel {
    /// Loads the embedded object with this kernel's tracepoint offsets,
    /// attaches every program, and hands out the maps and the ring buffer.
    /// `ring_bytes` sizes the event ring buffer (a power of two, at least a
    /// page).
    pub fn load(
        cgroup2_root: &std::path::Path,
        pin_dir: &std::path::Path,
        ring_bytes: u32,
        unix_fencing: bool,
        capacities: &[(&'static str, u32)],
        dns_per_agent: bool,
    ) -> Result<(Self, KernelMaps, Ring), KernelError> {
        if EBPF_OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        let offsets = tracefs::Offsets::read()?;
        let mut loader = EbpfLoader::new();
        loader
            .override_global("FORK_CHILD_PID_OFF", &offsets.fork_child_pid, true)
            .override_global("EXEC_FILENAME_OFF", &offsets.exec_filename, true)
            .override_global("EXEC_OLD_PID_OFF", &offsets.exec_old_pid, true)
            .override_global("EXIT_GROUP_DEAD_OFF", &offsets.exit_group_dead, true);
        loader.map_max_entries(agent_guard_common::maps::EVENTS, ring_bytes);
        loader.map_max_entries(agent_guard_common::maps::PROCS, procs_capacity());
        for (name, n) in capacities {
            loader.map_max_entries(name, *n);
            // CAPS_EXACT holds a subset of CAPS: same size.
            if *name == agent_guard_common::maps::CAPS {
                loader.map_max_entries(agent_guard_common::maps::CAPS_EXACT, *n);
            }
        }
        maps::set_capacities(capacities.to_vec());
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        let root = File::open(cgroup2_root).map_err(|source| KernelError::CgroupRoot {
            path: cgroup2_root.to_path_buf(),
            source,
        })?;
        let mut attached = Vec::new();
        let mut pins = Pins::new(pin_dir)?;
        for &name in CGROUP_PROGRAMS {
            // recvmsg4/6 run on every UDP receive on the host; they only
            // restore the source of per-agent DNS answers, so they are not
            // attached in shared DNS mode (nothing for them to do).
            if !dns_per_agent && RECVMSG_PROGRAMS.contains(&name) {
                continue;
            }
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| KernelError::Program { name, source })?;
            // aya uses bpf_link_create here, which wants flags = 0: Single.
            // A link attachment is multi-attach anyway, so we coexist with
            // other BPF users of the root cgroup.
            let id = prog
                .attach(&root, CgroupAttachMode::Single)
                .map_err(|source| KernelError::Program { name, source })?;
            let link = prog
                .take_link(id)
                .map_err(|source| KernelError::Program { name, source })?;
            pins.pin(name, link.try_into())?;
            attached.push(format!("cgroup/{name}"));
        }
        {
            let name = "sock_create";
            let prog: &mut CgroupSock = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| KernelError::Program { name, source })?;
            let id = prog
                .attach(&root, CgroupAttachMode::Single)
                .map_err(|source| KernelError::Program { name, source })?;
            let link = prog
                .take_link(id)
                .map_err(|source| KernelError::Program { name, source })?;
            pins.pin(name, link.try_into())?;
            attached.push(format!("cgroup/{name}"));
        }
        for &name in TRACEPOINTS {
            let prog: &mut TracePoint = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| KernelError::Program { name, source })?;
            let id = prog
                .attach("sched", name)
                .map_err(|source| KernelError::Program { name, source })?;
            let link = prog
                .take_link(id)
                .map_err(|source| KernelError::Program { name, source })?;
            pins.pin(name, link.try_into())?;
            attached.push(format!("tracepoint/sched/{name}"));
        }

        // Unix socket hooks: relocated against the maps just created, so
        // before any map is taken out of `ebpf`.
        let layout = if unix_fencing {
            unix::Layout::from_kernel().map_err(|e| e.to_string())
        } else {
            Err("turned off (agent-guard daemon --unix-fencing off)".to_string())
        };
        let (unix_hooks, unix_support) = match layout {
            Err(e) => (None, UnixSupport::Unavailable(e)),
            Ok(layout) => match unix::attach(&ebpf, EBPF_OBJECT, root.as_fd()) {
                Ok(h) => {
                    for (name, fd) in h.links() {
                        pins.pin_fd(name, fd)?;
                    }
                    attached.extend(h.attached.iter().cloned());
                    (Some((h, layout)), UnixSupport::Enforced)
                }
                Err(e) => (None, UnixSupport::Unavailable(e.to_string())),
            },
        };
        if let UnixSupport::Unavailable(why) = &unix_support {
            tracing::warn!(
                "Unix socket endpoints are not fenced on this kernel: {why}; tagged processes can reach any Unix socket their file permissions allow"
            );
        }

        // PROCS is pinned so a launcher can check with the kernel (not just
        // the socket's word) that it really was tagged.
        let pin = procs_pin(pin_dir);
        let _ = std::fs::remove_file(&pin);
        ebpf.map(agent_guard_common::maps::PROCS)
            .ok_or(KernelError::MissingMap(agent_guard_common::maps::PROCS))?
            .pin(&pin)
            .map_err(|e| KernelError::Pin {
                path: pin.clone(),
                source: e,
            })?;
        // A daemon that takes over after a crash reads these: the old
        // tagging, and what was lost or never read while no daemon ran.
        for name in TAKEOVER_MAPS {
            let path = pin_dir.join(name);
            let _ = std::fs::remove_file(&path);
            ebpf.map(name)
                .ok_or(KernelError::MissingMap(name))?
                .pin(&path)
                .map_err(|e| KernelError::Pin {
                    path: path.clone(),
                    source: e,
                })?;
        }
        let ring = maps::take(&mut ebpf, agent_guard_common::maps::EVENTS)?;
        let mut maps = KernelMaps::take(&mut ebpf)?;
        let mut program_ids: Vec<(String, u32)> = ebpf
            .programs()
            .filter_map(|(name, p)| Some((name.to_string(), p.info().ok()?.id())))
            .collect();
        let unix_hooks = unix_hooks.map(|(h, layout)| {
            maps.set_unix_layout(Some(layout));
            program_ids.extend(h.ids.iter().cloned());
            h
        });
        Ok((
            Self {
                _ebpf: ebpf,
                pins,
                keep: false,
                _unix: unix_hooks,
                unix: unix_support,
                attached,
                program_ids,
            },
            maps,
            ring,
        ))
    }
}

impl Drop for Kernel {
    /// A clean shutdown or a failed start unpins every link, so the
    /// programs detach with the handles. A panic keeps them (like a kill):
    /// the fence holds until a new daemon takes over.
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("panicking: links stay pinned, the kernel keeps enforcing");
            return;
        }
        if self.keep {
            return;
        }
        self.pins.release();
    }
}

impl Kernel {
    /// Leave the programs attached (pinned) when this handle goes: tagged
    /// processes are still running and must stay fenced until the next
    /// daemon takes over.
    pub fn keep_attached(&mut self) {
        self.keep = true;
    }
}

/// Maps whose size `daemon --map-capacity NAME=N` may set, with their
/// default capacity.
pub const SIZABLE_MAPS: &[(&str, u32)] = &[
    (
        agent_guard_common::maps::CGROUPS,
        agent_guard_common::capacity::CGROUPS,
    ),
    (
        agent_guard_common::maps::SUBJECTS,
        agent_guard_common::capacity::SUBJECTS,
    ),
    (
        agent_guard_common::maps::CAPS,
        agent_guard_common::capacity::CAPS,
    ),
    (
        agent_guard_common::maps::GRANTS,
        agent_guard_common::capacity::GRANTS,
    ),
    (
        agent_guard_common::maps::GRANT_STATE,
        agent_guard_common::capacity::GRANT_STATE,
    ),
    (
        agent_guard_common::maps::UNIX_PATHS,
        agent_guard_common::capacity::UNIX_PATHS,
    ),
    (
        agent_guard_common::maps::FLOWS,
        agent_guard_common::capacity::FLOWS,
    ),
];

/// Parses `NAME=N` for `--map-capacity`.
pub fn parse_map_capacity(s: &str) -> Result<(&'static str, u32), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: write MAP=N, e.g. GRANTS=131072"))?;
    let known: Vec<&str> = SIZABLE_MAPS.iter().map(|(m, _)| *m).collect();
    let map = SIZABLE_MAPS
        .iter()
        .map(|(m, _)| *m)
        .find(|m| *m == name)
        .ok_or_else(|| {
            format!(
                "{name:?} is not a map whose size can be set (one of: {})",
                known.join(", ")
            )
        })?;
    let n: u32 = n.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n == 0 || n > 1 << 24 {
        return Err(format!("{s:?}: capacity must be 1..=16777216"));
    }
    Ok((map, n))
}

/// Maps pinned (besides `PROCS`) for a daemon that takes over after a crash.
pub const TAKEOVER_MAPS: [&str; 5] = [
    agent_guard_common::maps::CGROUPS,
    // Uses left of use-counted grants, restored by the successor.
    agent_guard_common::maps::GRANT_STATE,
    agent_guard_common::maps::LOST,
    agent_guard_common::maps::EVENTS,
    // Flows (`--flow-records`) counted but not collected.
    agent_guard_common::maps::FLOWS,
];

/// Where the links are pinned.
/// `<pin-dir>/links-<daemon pid>`: the pid tells a live owner (another
/// daemon on the same pin dir: refuse) from a dead one (take over).
pub fn links_dir(pin_dir: &std::path::Path, pid: u32) -> PathBuf {
    pin_dir.join(format!("{LINKS_PREFIX}{pid}"))
}

pub const LINKS_PREFIX: &str = "links-";

/// Pinned links of this daemon.
struct Pins {
    dir: PathBuf,
    links: Vec<aya::programs::links::PinnedLink>,
    /// Pins of links we hold as raw fds (the Unix hooks).
    raw: Vec<PathBuf>,
}

impl Pins {
    fn new(pin_dir: &std::path::Path) -> Result<Self, KernelError> {
        let dir = links_dir(pin_dir, std::process::id());
        std::fs::create_dir_all(&dir).map_err(|source| KernelError::PinIo {
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            dir,
            links: Vec::new(),
            raw: Vec::new(),
        })
    }

    fn pin(
        &mut self,
        name: &str,
        link: Result<aya::programs::links::FdLink, aya::programs::links::LinkError>,
    ) -> Result<(), KernelError> {
        let path = self.dir.join(name);
        let _ = std::fs::remove_file(&path);
        match link {
            Ok(l) => {
                let pinned = l.pin(&path).map_err(|source| KernelError::Pin {
                    path: path.clone(),
                    source,
                })?;
                self.links.push(pinned);
            }
            // An old kernel without bpf_link for this attach type: the link
            // dies with the daemon (logged once here).
            Err(e) => {
                tracing::warn!("link of {name} cannot be pinned ({e}); it ends with the daemon")
            }
        }
        Ok(())
    }

    fn pin_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), KernelError> {
        let path = self.dir.join(name);
        let _ = std::fs::remove_file(&path);
        unix::pin_object(fd, &path).map_err(|source| KernelError::PinIo {
            path: path.clone(),
            source,
        })?;
        self.raw.push(path);
        Ok(())
    }

    fn release(&mut self) {
        for l in self.links.drain(..) {
            let _ = l.unpin();
        }
        for p in self.raw.drain(..) {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?;
    prog.try_into()
        .map_err(|source| KernelError::Program { name, source })
}

/// Where the daemon pins `PROCS` inside its pin dir.
pub fn procs_pin(pin_dir: &std::path::Path) -> PathBuf {
    pin_dir.join(agent_guard_common::maps::PROCS)
}

/// Looks `pid` up in a pinned `PROCS` map (the launcher's self-check).
pub fn pinned_process_subject(pin: &std::path::Path, pid: u32) -> Result<Option<u32>, KernelError> {
    let name = agent_guard_common::maps::PROCS;
    let data =
        aya::maps::MapData::from_pin(pin).map_err(|source| KernelError::Map { name, source })?;
    let map: aya::maps::HashMap<_, u32, u32> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|source| KernelError::Map { name, source })?;
    match map.get(&pid, 0) {
        Ok(s) => Ok(Some(s)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(KernelError::Map { name, source }),
    }
}

/// `PROCS` holds every pid and tid the kernel can hand out: at least
/// `capacity::PROCS`, else the kernel's `pid_max` (at most 2^22).
pub fn procs_capacity() -> u32 {
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(agent_guard_common::capacity::PROCS);
    pid_max.clamp(agent_guard_common::capacity::PROCS, 1 << 22)
}

/// Calls and total run time of our programs since load, as the kernel
/// counts them while `kernel.bpf_stats_enabled` is 1 (off by default: it
/// adds two clock reads per run).
pub fn program_stats(ids: &[(String, u32)]) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for info in aya::programs::loaded_programs().flatten() {
        if let Some((name, _)) = ids.iter().find(|(_, id)| *id == info.id()) {
            out.insert(
                name.clone(),
                (
                    info.run_count(),
                    u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                ),
            );
        }
    }
    out
}
