//! `audit replay`: read chains back as a filtered timeline, a process /
//! delegation tree, or re-judged under another policy (`--what-if`).
//!
//! Records are streamed, never all held: what must be known before the
//! first line is printed (column widths, the merge order of several
//! chains, each process's summary for the tree) comes from an earlier pass
//! over the files, and orders are sorted on disk past some ten
//! thousand records ([`super::external_sort`]). Memory stays in the tens of
//! MiB at ten million records; only `--tree` grows, with the number of
//! distinct processes (tens of bytes each), not of records.

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    net::IpAddr,
    path::{Path, PathBuf},
};

use thiserror::Error;

pub use super::external_sort::Loc;
use super::{
    AuditRecord, NODE_LOG, chain_dirs, chain_files,
    external_sort::{Entry, ExternalSort, Sorted, SpillError},
    progress::{Progress, Tally},
};
use crate::policy::{CompiledAgent, CompiledPolicy, Mode, ToolEndpoint};

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("{}: {source}{}", path.display(), io_hint(source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0}: no such audit directory (pass --audit-dir DIR, the daemon's --audit-dir; default /var/lib/agent-guard/audit)"
    )]
    NoAuditDir(PathBuf),
    #[error("no audit chain for tenant {tenant:?} in {} ({known})", dir.display())]
    NoTenant {
        tenant: String,
        dir: PathBuf,
        known: String,
    },
    #[error(
        "{}: the record at byte {offset} is gone or changed since the first pass read it (a daemon's retention or rotation?); run the replay again, or replay a copy of the trail",
        path.display()
    )]
    Changed { path: PathBuf, offset: u64 },
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
}

/// What to do about a read error, where there is something to do.
fn io_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            " (the trail is readable by root only: run with sudo, or as a member of the group that owns it)"
        }
        std::io::ErrorKind::NotFound => {
            " (a file went away while replaying: the daemon's retention? run again, or replay a copy)"
        }
        _ => "",
    }
}

/// Which records to show. Gap records pass every filter but tenant and
/// time, so a responder sees where events were lost.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    /// Matches the agent and its sub-agents (any element of the subject
    /// chain after the tenant).
    pub agent: Option<String>,
    pub pid: Option<u32>,
    /// RFC 3339 UTC with nanoseconds, as records store `ts` (so a string
    /// comparison orders them).
    pub since: Option<String>,
    pub until: Option<String>,
    pub verdict: Option<String>,
    pub tool: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        if self
            .since
            .as_ref()
            .is_some_and(|s| r.ts.as_str() < s.as_str())
            || self
                .until
                .as_ref()
                .is_some_and(|u| r.ts.as_str() > u.as_str())
        {
            return false;
        }
        if r.kind == "gap" {
            return true;
        }
        if let Some(a) = &self.agent {
            let in_chain = r
                .subject
                .as_deref()
                .is_some_and(|s| s.split('/').skip(1).any(|part| part == a));
            if !in_chain && r.agent.as_deref() != Some(a) {
                return false;
            }
        }
        if self.pid.is_some() && r.pid != self.pid {
            return false;
        }
        if self.verdict.is_some() && r.verdict != self.verdict {
            return false;
        }
        if self.tool.is_some() && r.tool != self.tool {
            return false;
        }
        true
    }
}

/// What reading produced besides records.
#[derive(Debug, Default)]
pub struct ReadStats {
    pub scanned: u64,
    /// Lines that are not records (torn lines); `audit verify` explains them.
    pub unreadable: u64,
    /// The first of them: file and 1-based line.
    pub first_unreadable: Option<(PathBuf, u64)>,
}

/// One file of the trail as it was when the replay started.
#[derive(Debug)]
struct TrailFile {
    path: PathBuf,
    /// Its length then: later passes read no further, so a daemon that is
    /// still writing cannot make them disagree with the first.
    len: u64,
    /// A chain's current file, held open: rotation renames it.
    held: Option<File>,
}

/// The files of the selected chains (every tenant, or one; `_node` only
/// when asked for by name), each chain's in chain order.
#[derive(Debug)]
pub struct Trail {
    files: Vec<TrailFile>,
    chains: usize,
    bytes: u64,
}

/// Read buffer of a sequential pass.
const SCAN_BUFFER: usize = 1 << 20;

impl Trail {
    pub fn open(audit_dir: &Path, tenant: Option<&str>) -> Result<Self, ReplayError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReplayError::Io { path, source }
        };
        if !audit_dir.is_dir() {
            return Err(ReplayError::NoAuditDir(audit_dir.to_path_buf()));
        }
        let dirs = chain_dirs(audit_dir).map_err(io(audit_dir))?;
        let selected: Vec<_> = dirs
            .iter()
            .filter(|(name, _)| match tenant {
                Some(t) => name == t,
                None => name != NODE_LOG,
            })
            .collect();
        if let Some(t) = tenant
            && selected.is_empty()
        {
            let names: Vec<&str> = dirs.iter().map(|(n, _)| n.as_str()).collect();
            let known = if names.is_empty() {
                "it holds no chains: is it the daemon's --audit-dir?".to_string()
            } else {
                format!(
                    "chains there: {}; pass one of them to --tenant",
                    names.join(", ")
                )
            };
            return Err(ReplayError::NoTenant {
                tenant: t.to_string(),
                dir: audit_dir.to_path_buf(),
                known,
            });
        }
        let mut files = Vec::new();
        for (_, dir) in &selected {
            for (number, path) in chain_files(dir).map_err(io(dir))? {
                let held = match number {
                    None => Some(File::open(&path).map_err(io(&path))?),
                    Some(_) => None,
                };
                let len = match &held {
                    Some(f) => f.metadata(),
                    None => std::fs::metadata(&path),
                }
                .map_err(io(&path))?
                .len();
                files.push(TrailFile { path, len, held });
            }
        }
        let bytes = files.iter().map(|f| f.len).sum();
        Ok(Self {
            files,
            chains: selected.len(),
            bytes,
        })
    }

    /// Bytes of the trail (one pass reads them all).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// More than one chain: records are merged by time.
    pub fn merged(&self) -> bool {
        self.chains > 1
    }

    fn path(&self, file: usize) -> &Path {
        self.files.get(file).map_or(Path::new("?"), |f| &f.path)
    }

    /// The file, from its start.
    fn file(&self, i: usize) -> Result<File, ReplayError> {
        let tf = &self.files[i];
        let io = |source| ReplayError::Io {
            path: tf.path.clone(),
            source,
        };
        let mut f = match &tf.held {
            Some(f) => f.try_clone().map_err(io)?,
            None => File::open(&tf.path).map_err(io)?,
        };
        f.seek(SeekFrom::Start(0)).map_err(io)?;
        Ok(f)
    }

    /// One pass in file order over every record that `filter` matches.
    fn scan(
        &self,
        filter: &Filter,
        progress: &Progress,
        stats: &mut ReadStats,
        mut f: impl FnMut(AuditRecord, Loc) -> Result<(), ReplayError>,
    ) -> Result<(), ReplayError> {
        progress.next_pass();
        let mut tally = Tally::new(progress);
        let mut buf = Vec::with_capacity(4096);
        for (i, tf) in self.files.iter().enumerate() {
            let file = u32::try_from(i).unwrap_or(u32::MAX);
            let mut reader = BufReader::with_capacity(SCAN_BUFFER, self.file(i)?.take(tf.len));
            let mut offset = 0u64;
            let mut line = 0u64;
            loop {
                buf.clear();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .map_err(|source| ReplayError::Io {
                        path: tf.path.clone(),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                line += 1;
                tally.line(n);
                stats.scanned += 1;
                match serde_json::from_slice::<AuditRecord>(buf.trim_ascii_end()) {
                    Ok(r) if filter.matches(&r) => f(r, Loc { file, offset })?,
                    Ok(_) => {}
                    Err(_) => {
                        stats.unreadable += 1;
                        stats
                            .first_unreadable
                            .get_or_insert_with(|| (tf.path.clone(), line));
                    }
                }
                offset += n as u64;
            }
        }
        Ok(())
    }
}

/// Reads single records by location, keeping a few files open and
/// positioned, since sorted locations mostly run on in the same file.
struct LocReader<'t> {
    trail: &'t Trail,
    /// (file, reader, position of the reader, last use).
    open: Vec<(usize, BufReader<File>, u64, u64)>,
    uses: u64,
    buf: Vec<u8>,
}

/// Files a [`LocReader`] keeps open, and its buffer for each.
const LOC_READERS: usize = 8;
const LOC_BUFFER: usize = 256 * 1024;

impl<'t> LocReader<'t> {
    fn new(trail: &'t Trail) -> Self {
        Self {
            trail,
            open: Vec::new(),
            uses: 0,
            buf: Vec::with_capacity(4096),
        }
    }

    /// The record at `loc`, and its line's length.
    fn read(&mut self, loc: Loc) -> Result<(AuditRecord, usize), ReplayError> {
        let file = loc.file as usize;
        self.uses += 1;
        let slot = match self.open.iter().position(|(f, ..)| *f == file) {
            Some(s) => s,
            None => {
                let reader = BufReader::with_capacity(LOC_BUFFER, self.trail.file(file)?);
                if self.open.len() >= LOC_READERS
                    && let Some(oldest) = (0..self.open.len()).min_by_key(|&s| self.open[s].3)
                {
                    self.open.swap_remove(oldest);
                }
                self.open.push((file, reader, 0, 0));
                self.open.len() - 1
            }
        };
        let path = self.trail.path(file);
        let (_, reader, pos, used) = &mut self.open[slot];
        *used = self.uses;
        let io = |source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        };
        if *pos != loc.offset {
            let delta = i64::try_from(i128::from(loc.offset) - i128::from(*pos)).map_err(|_| {
                ReplayError::Changed {
                    path: path.to_path_buf(),
                    offset: loc.offset,
                }
            })?;
            reader.seek_relative(delta).map_err(io)?;
            *pos = loc.offset;
        }
        self.buf.clear();
        let n = reader.read_until(b'\n', &mut self.buf).map_err(io)?;
        *pos += n as u64;
        let r = serde_json::from_slice::<AuditRecord>(self.buf.trim_ascii_end()).map_err(|_| {
            ReplayError::Changed {
                path: path.to_path_buf(),
                offset: loc.offset,
            }
        })?;
        Ok((r, n))
    }
}

/// A record's `ts` as a sort key that orders like the string: a
/// well-formed `2026-11-23T10:00:00.123456789Z` without the separators
/// after its first `-` (24 bytes); any other form, its first 24 bytes. (A
/// malformed `ts` that starts like a well-formed one, `2026-...`, may sort
/// differently from the string among those of its year.)
fn time_key(ts: &str) -> [u64; 3] {
    const SEPARATORS: [(usize, u8); 7] = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (29, b'Z'),
    ];
    let b = ts.as_bytes();
    let mut key = [0u8; 24];
    let canonical = b.len() == 30 && SEPARATORS.iter().all(|&(i, c)| b[i] == c);
    if canonical {
        let kept = b
            .iter()
            .enumerate()
            .filter(|(i, _)| *i <= 4 || !SEPARATORS.iter().any(|&(s, _)| s == *i))
            .map(|(_, c)| *c);
        for (k, c) in key.iter_mut().zip(kept) {
            *k = c;
        }
    } else {
        for (k, c) in key.iter_mut().zip(b) {
            *k = *c;
        }
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&key[i * 8..i * 8 + 8]);
        u64::from_be_bytes(w)
    };
    [word(0), word(1), word(2)]
}

/// The selected records in replay order: each chain in order, the chains
/// merged by time (stable: at equal times, trail order). A first pass in
/// file order finds the matching records and, when chains are merged, sorts
/// their locations by time (on disk past 65,536 records); later
/// passes read the records again in that order. Memory does not grow with
/// the trail.
pub struct Ordered<'t> {
    trail: &'t Trail,
    filter: &'t Filter,
    by_time: Option<Sorted>,
}

impl<'t> Ordered<'t> {
    /// The first pass: `visit` sees every matching record in file order
    /// (which is replay order unless [`Trail::merged`]).
    pub fn build(
        trail: &'t Trail,
        filter: &'t Filter,
        progress: &Progress,
        stats: &mut ReadStats,
        mut visit: impl FnMut(&AuditRecord, Loc) -> Result<(), ReplayError>,
    ) -> Result<Self, ReplayError> {
        let mut sort = trail.merged().then(ExternalSort::default);
        trail.scan(filter, progress, stats, |r, loc| {
            visit(&r, loc)?;
            if let Some(s) = sort.as_mut() {
                s.push(Entry {
                    key: time_key(&r.ts),
                    loc,
                })?;
            }
            Ok(())
        })?;
        let by_time = sort.map(ExternalSort::finish).transpose()?;
        Ok(Self {
            trail,
            filter,
            by_time,
        })
    }

    /// A pass in replay order.
    pub fn each(
        &self,
        progress: &Progress,
        mut f: impl FnMut(&AuditRecord, Loc) -> Result<(), ReplayError>,
    ) -> Result<(), ReplayError> {
        let Some(sorted) = &self.by_time else {
            return self.trail.scan(
                self.filter,
                progress,
                &mut ReadStats::default(),
                |r, loc| f(&r, loc),
            );
        };
        progress.next_pass();
        let mut tally = Tally::new(progress);
        let mut reader = LocReader::new(self.trail);
        sorted.for_each(|e: Entry| {
            let (r, n) = reader.read(e.loc)?;
            tally.line(n);
            f(&r, e.loc)
        })
    }
}

/// Matching records in replay order, in as few passes as that takes: one
/// for a single chain, two when chains are merged.
pub fn stream(
    trail: &Trail,
    filter: &Filter,
    progress: &Progress,
    stats: &mut ReadStats,
    mut f: impl FnMut(&AuditRecord) -> Result<(), ReplayError>,
) -> Result<(), ReplayError> {
    if trail.merged() {
        progress.set_total(trail.bytes(), 2);
        let ordered = Ordered::build(trail, filter, progress, stats, |_, _| Ok(()))?;
        ordered.each(progress, |r, _| f(r))
    } else {
        progress.set_total(trail.bytes(), 1);
        trail.scan(filter, progress, stats, |r, _| f(&r))
    }
}

/// `dst:port/proto`, with brackets around IPv6 addresses; `unix:PATH` for
/// a Unix socket, `dns:NAME` for a per-agent DNS query.
pub fn destination(r: &AuditRecord) -> String {
    if let Some(p @ ("unix" | "dns")) = r.proto.as_deref() {
        return format!("{p}:{}", r.dst.as_deref().unwrap_or("?"));
    }
    match (&r.dst, r.port) {
        (Some(d), Some(p)) if d.contains(':') => {
            format!("[{d}]:{p}/{}", r.proto.as_deref().unwrap_or("?"))
        }
        (Some(d), Some(p)) => format!("{d}:{p}/{}", r.proto.as_deref().unwrap_or("?")),
        _ => r.proto.clone().unwrap_or_default(),
    }
}

/// Short description of a gap record's losses.
pub fn lost_summary(r: &AuditRecord) -> String {
    let lost = r
        .lost
        .as_ref()
        .map(|l| {
            l.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!("lost {lost}")
}

/// What `--tree` prints, item by item: a tenant, its gap records, then its
/// subject chains (sorted, so a sub-agent follows its parent), each with
/// its processes (in order of first appearance) and their records (in
/// replay order).
#[derive(Debug)]
pub enum TreeItem<'a> {
    Tenant(&'a str),
    Gap(&'a AuditRecord),
    Subject(&'a str),
    Process(&'a ProcSummary, &'a TreeNames),
    Record(&'a AuditRecord),
}

/// A process of the tree: what its records say about it, in replay order
/// (the first ppid; comm and exe from its last exec, or else its first
/// record that has them).
#[derive(Debug, Clone)]
pub struct ProcSummary {
    pub pid: u32,
    pub ppid: Option<u32>,
    comm: Option<u32>,
    exe: Option<u32>,
    subject: u32,
}

impl ProcSummary {
    pub fn comm<'a>(&self, names: &'a TreeNames) -> Option<&'a str> {
        self.comm.map(|i| names.get(i))
    }

    pub fn exe<'a>(&self, names: &'a TreeNames) -> Option<&'a str> {
        self.exe.map(|i| names.get(i))
    }
}

/// Interned strings: tenants, subjects, comms and exes repeat in every
/// record, so each is kept once.
#[derive(Debug, Default)]
pub struct TreeNames {
    names: Vec<String>,
    ids: HashMap<String, u32>,
}

impl TreeNames {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.push(s.to_string());
        self.ids.insert(s.to_string(), id);
        id
    }

    fn get(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("?", String::as_str)
    }
}

/// Everything the tree must know before it prints: one entry per process
/// (not per record), so memory grows with the processes in the trail.
#[derive(Debug, Default)]
struct TreeIndex {
    names: TreeNames,
    /// Tenant name id -> rank among the sorted tenants (after `rank`).
    tenants: HashMap<u32, u32>,
    /// (tenant, subject) name ids -> subject index.
    subjects: HashMap<(u32, u32), u32>,
    subject_list: Vec<(u32, u32)>,
    /// (subject index, pid) -> process index; processes in order of
    /// first appearance.
    procs: HashMap<(u32, u32), u32>,
    proc_list: Vec<ProcSummary>,
    /// After `rank`: tenant names in order, and each subject's rank.
    tenant_order: Vec<u32>,
    subject_rank: Vec<u32>,
}

impl TreeIndex {
    /// Takes in one record, in replay order.
    fn learn(&mut self, r: &AuditRecord) {
        let tenant = self.names.intern(r.tenant.as_deref().unwrap_or("?"));
        let next = u32::try_from(self.tenants.len()).unwrap_or(u32::MAX);
        self.tenants.entry(tenant).or_insert(next);
        if r.kind == "gap" {
            return;
        }
        let (Some(subject), Some(pid)) = (r.subject.as_deref(), r.pid) else {
            return;
        };
        let subject = self.names.intern(subject);
        let next = u32::try_from(self.subject_list.len()).unwrap_or(u32::MAX);
        let s = *self.subjects.entry((tenant, subject)).or_insert_with(|| {
            self.subject_list.push((tenant, subject));
            next
        });
        let next = u32::try_from(self.proc_list.len()).unwrap_or(u32::MAX);
        let p = *self.procs.entry((s, pid)).or_insert_with(|| {
            self.proc_list.push(ProcSummary {
                pid,
                ppid: None,
                comm: None,
                exe: None,
                subject: s,
            });
            next
        });
        let exec = r.kind == "exec";
        let comm = r.comm.as_deref().map(|c| self.names.intern(c));
        let exe = r.exe.as_deref().map(|e| self.names.intern(e));
        let Some(p) = self.proc_list.get_mut(p as usize) else {
            return;
        };
        p.ppid = p.ppid.or(r.ppid);
        if exec || p.comm.is_none() {
            p.comm = comm.or(p.comm);
        }
        if exec || p.exe.is_none() {
            p.exe = exe.or(p.exe);
        }
    }

    /// Orders tenants and subjects by name.
    fn rank(&mut self) {
        let mut tenants: Vec<u32> = self.tenants.keys().copied().collect();
        tenants.sort_by(|a, b| self.names.get(*a).cmp(self.names.get(*b)));
        for (rank, t) in tenants.iter().enumerate() {
            self.tenants
                .insert(*t, u32::try_from(rank).unwrap_or(u32::MAX));
        }
        self.tenant_order = tenants;
        let mut subjects: Vec<u32> = (0..self.subject_list.len() as u32).collect();
        subjects.sort_by(|a, b| {
            let (ta, sa) = self.subject_list[*a as usize];
            let (tb, sb) = self.subject_list[*b as usize];
            (self.tenants[&ta], self.names.get(sa)).cmp(&(self.tenants[&tb], self.names.get(sb)))
        });
        self.subject_rank = vec![0; subjects.len()];
        for (rank, s) in subjects.iter().enumerate() {
            self.subject_rank[*s as usize] = u32::try_from(rank).unwrap_or(u32::MAX);
        }
    }

    /// Where a record goes in the tree: (tenant rank, 0 for a gap or 1 +
    /// subject rank), process, replay position. `None`: not in the tree.
    fn key(&self, r: &AuditRecord, position: u64) -> Option<[u64; 3]> {
        let tenant = *self.names.ids.get(r.tenant.as_deref().unwrap_or("?"))?;
        let rank = u64::from(*self.tenants.get(&tenant)?) << 32;
        if r.kind == "gap" {
            return Some([rank, 0, position]);
        }
        let subject = *self.names.ids.get(r.subject.as_deref()?)?;
        let s = *self.subjects.get(&(tenant, subject))?;
        let p = *self.procs.get(&(s, r.pid?))?;
        let srank = u64::from(*self.subject_rank.get(s as usize)?);
        Some([rank | (srank + 1), u64::from(p), position])
    }
}

/// `--tree`: hands `emit` the tree item by item. Passes: one to learn the
/// processes (two when chains are merged), one to sort the records into
/// tree order (on disk past 65,536 records), one to print.
pub fn tree(
    trail: &Trail,
    filter: &Filter,
    progress: &Progress,
    stats: &mut ReadStats,
    mut emit: impl FnMut(TreeItem<'_>) -> Result<(), ReplayError>,
) -> Result<(), ReplayError> {
    let merged = trail.merged();
    progress.set_total(trail.bytes(), if merged { 4 } else { 3 });
    let mut ix = TreeIndex::default();
    let ordered = Ordered::build(trail, filter, progress, stats, |r, _| {
        if !merged {
            ix.learn(r);
        }
        Ok(())
    })?;
    if merged {
        ordered.each(progress, |r, _| {
            ix.learn(r);
            Ok(())
        })?;
    }
    ix.rank();
    let mut sort = ExternalSort::default();
    let mut position = 0u64;
    ordered.each(progress, |r, loc| {
        if let Some(key) = ix.key(r, position) {
            sort.push(Entry { key, loc })?;
        }
        position += 1;
        Ok(())
    })?;
    let sorted = sort.finish()?;

    progress.next_pass();
    let mut tally = Tally::new(progress);
    let mut reader = LocReader::new(trail);
    let mut next_tenant = 0usize;
    let mut at: Option<(u64, u64)> = None;
    sorted.for_each(|e: Entry| {
        let tenant = (e.key[0] >> 32) as usize;
        while next_tenant <= tenant {
            let name = ix.tenant_order.get(next_tenant).copied().unwrap_or(0);
            emit(TreeItem::Tenant(ix.names.get(name)))?;
            next_tenant += 1;
        }
        let (r, n) = reader.read(e.loc)?;
        tally.line(n);
        if e.key[0] & 0xffff_ffff == 0 {
            return emit(TreeItem::Gap(&r));
        }
        let proc = ix.proc_list.get(e.key[1] as usize);
        if at.is_none_or(|(group, _)| group != e.key[0]) {
            let subject = proc
                .and_then(|p| ix.subject_list.get(p.subject as usize))
                .map_or("?", |(_, s)| ix.names.get(*s));
            emit(TreeItem::Subject(subject))?;
        }
        if at != Some((e.key[0], e.key[1]))
            && let Some(p) = proc
        {
            emit(TreeItem::Process(p, &ix.names))?;
        }
        at = Some((e.key[0], e.key[1]));
        emit(TreeItem::Record(&r))
    })?;
    for t in ix.tenant_order.iter().skip(next_tenant) {
        emit(TreeItem::Tenant(ix.names.get(*t)))?;
    }
    Ok(())
}

/// How a recorded call fares under another policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    /// `allow`, `deny` or `would_deny`.
    pub verdict: &'static str,
    pub tool: Option<String>,
    pub reason: &'static str,
}

#[derive(Debug, Default)]
pub struct WhatIfSummary {
    pub judged: u64,
    pub allow_to_deny: u64,
    pub deny_to_allow: u64,
    pub other_changes: u64,
    /// Calls whose verdict would change (the three above).
    pub changed: u64,
    /// Calls whose recorded verdict came from a grant: judged by the base
    /// policy only.
    pub granted: u64,
}

/// Re-judges connect/sendmsg records under a compiled policy, the way the
/// kernel does: the (tenant, root agent) capability set, longest matching
/// prefix, IPv4 as v4-mapped IPv6.
pub struct WhatIf {
    policy: CompiledPolicy,
}

impl WhatIf {
    pub fn new(policy: CompiledPolicy) -> Self {
        Self { policy }
    }

    pub fn judge(&self, r: &AuditRecord) -> Option<Judgement> {
        if r.kind != "connect" && r.kind != "sendmsg" {
            return None;
        }
        // Not a policy decision: the control socket and the per-agent DNS
        // proxy are always reachable.
        if matches!(r.reason.as_deref(), Some("control_socket" | "dns_proxied")) {
            return None;
        }
        let tenant = r.tenant.as_deref()?;
        let root = r
            .subject
            .as_deref()
            .and_then(|s| s.split('/').nth(1))
            .or(r.agent.as_deref())?;
        if r.proto.as_deref() == Some("unix") {
            return self.judge_unix(tenant, root, r.dst.as_deref()?);
        }
        let addr: IpAddr = r.dst.as_deref()?.parse().ok()?;
        let port = r.port?;
        let proto = match r.proto.as_deref()? {
            "tcp" => 6,
            "udp" => 17,
            other => other.parse().ok()?,
        };
        let key = match addr {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let agent = match self.agent(tenant, root) {
            Ok(a) => a,
            Err(j) => return Some(j),
        };
        let mut best: Option<(u8, u32)> = None;
        for &tool_id in &agent.tool_ids {
            let Some(eps) = usize::try_from(tool_id)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| self.policy.tool_endpoints.get(i))
            else {
                continue;
            };
            for ep in eps {
                if ep.proto == proto
                    && ep.port == port
                    && prefix_match(ep, &key)
                    && best.is_none_or(|(len, _)| ep.prefix_len > len)
                {
                    best = Some((ep.prefix_len, tool_id));
                }
            }
        }
        Some(match best {
            Some((_, tool_id)) => self.covered(tool_id),
            None => uncovered(agent),
        })
    }

    /// The policy's root agent of a record, or the verdict for one the
    /// policy no longer has.
    fn agent(&self, tenant: &str, root: &str) -> Result<&CompiledAgent, Judgement> {
        self.policy
            .agent_index(tenant, root)
            .map(|i| &self.policy.agents[i])
            .ok_or(Judgement {
                verdict: "deny",
                tool: None,
                reason: "unknown_subject",
            })
    }

    fn covered(&self, tool_id: u32) -> Judgement {
        Judgement {
            verdict: "allow",
            tool: self.policy.tool_name(tool_id).map(str::to_string),
            reason: "granted",
        }
    }

    /// A Unix socket call: the exact address against the agent's tools'
    /// `unix` endpoints. (The control socket, always reachable, is judged
    /// as the policy sees it: not covered by a tool.)
    fn judge_unix(&self, tenant: &str, root: &str, dst: &str) -> Option<Judgement> {
        let agent = match self.agent(tenant, root) {
            Ok(a) => a,
            Err(j) => return Some(j),
        };
        let key = crate::policy::unix_key(dst);
        let tool = agent.tool_ids.iter().copied().find(|&id| {
            usize::try_from(id)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| self.policy.tool_unix.get(i))
                .is_some_and(|paths| paths.contains(&key))
        });
        Some(match tool {
            Some(id) => self.covered(id),
            None => uncovered(agent),
        })
    }
}

impl WhatIfSummary {
    /// Counts a call judged `now`; true when its verdict would change.
    pub fn add(&mut self, r: &AuditRecord, now: &Judgement) -> bool {
        self.judged += 1;
        if r.grant.is_some() {
            self.granted += 1;
        }
        let was = r.verdict.as_deref().unwrap_or("");
        if was == now.verdict {
            return false;
        }
        // `would_deny` let the call through.
        let was_allowed = was != "deny";
        let now_allowed = now.verdict != "deny";
        match (was_allowed, now_allowed) {
            (true, false) => self.allow_to_deny += 1,
            (false, true) => self.deny_to_allow += 1,
            _ => self.other_changes += 1,
        }
        self.changed += 1;
        true
    }
}

/// No tool covers the call: refused, or reported under monitor mode.
fn uncovered(agent: &CompiledAgent) -> Judgement {
    Judgement {
        verdict: match agent.mode {
            Mode::Enforce => "deny",
            Mode::Monitor => "would_deny",
        },
        tool: None,
        reason: "no_capability",
    }
}

fn prefix_match(ep: &ToolEndpoint, key: &[u8; 16]) -> bool {
    let bits = u128::from_be_bytes(*key);
    let net = u128::from_be_bytes(ep.addr);
    let len = u32::from(ep.prefix_len.min(128));
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    bits & mask == net & mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn call(agent_chain: &str, dst: &str, port: u16, verdict: &str) -> AuditRecord {
        let mut r = AuditRecord::new("connect");
        r.ts = "2026-01-01T00:00:00.000000000Z".into();
        r.tenant = Some("acme".into());
        r.agent = agent_chain.rsplit('/').next().map(str::to_string);
        r.subject = Some(format!("acme/{agent_chain}"));
        r.pid = Some(7);
        r.dst = Some(dst.into());
        r.port = Some(port);
        r.proto = Some("tcp".into());
        r.verdict = Some(verdict.into());
        r
    }

    const POLICY: &str = r#"
default_mode = "enforce"
[[tenant]]
name = "acme"
[[tool]]
name = "search"
endpoints = [{ cidr = "127.0.0.0/8", port = 80 }]
[[tool]]
name = "search-local"
endpoints = [{ cidr = "127.0.0.1/32", port = 80 }]
[[agent]]
tenant = "acme"
name = "researcher"
tools = ["search", "search-local"]
"#;

    #[test]
    fn destinations_print_by_kind() {
        let mut r = call("researcher", "::1", 443, "allow");
        assert_eq!(destination(&r), "[::1]:443/tcp");
        r.dst = Some("/run/proxy.sock".into());
        r.port = None;
        r.proto = Some("unix".into());
        assert_eq!(destination(&r), "unix:/run/proxy.sock");
        r.dst = Some("api.example".into());
        r.proto = Some("dns".into());
        assert_eq!(destination(&r), "dns:api.example");
    }

    #[test]
    fn what_if_judges_unix_socket_calls_by_exact_path() {
        let policy = format!(
            "{POLICY}[[tool]]\nname = \"proxy\"\nendpoints = [{{ unix = \"/run/proxy.sock\" }}, {{ unix = \"@px\" }}]\n"
        )
        .replace(r#"tools = ["search", "search-local"]"#, r#"tools = ["search", "proxy"]"#);
        let w = WhatIf::new(
            Policy::from_str(&policy, "p.toml")
                .expect("policy")
                .compile()
                .expect("compile"),
        );
        let unix = |dst: &str| {
            let mut r = call("researcher", dst, 0, "deny");
            r.port = None;
            r.proto = Some("unix".into());
            r
        };
        let j = w.judge(&unix("/run/proxy.sock")).expect("judged");
        assert_eq!((j.verdict, j.tool.as_deref()), ("allow", Some("proxy")));
        assert_eq!(w.judge(&unix("@px")).expect("judged").verdict, "allow");
        let j = w.judge(&unix("/run//proxy.sock")).expect("judged");
        assert_eq!((j.verdict, j.reason), ("deny", "no_capability"));
    }

    #[test]
    fn what_if_matches_like_the_kernel() {
        let w = WhatIf::new(
            Policy::from_str(POLICY, "p.toml")
                .expect("policy")
                .compile()
                .expect("compile"),
        );
        let j = w
            .judge(&call("researcher", "127.0.0.1", 80, "deny"))
            .expect("judged");
        assert_eq!(j.verdict, "allow");
        assert_eq!(
            j.tool.as_deref(),
            Some("search-local"),
            "longest prefix wins"
        );
        let j = w
            .judge(&call(
                "researcher/summarizer",
                "::ffff:127.0.0.9",
                80,
                "deny",
            ))
            .expect("judged");
        assert_eq!(
            (j.verdict, j.tool.as_deref()),
            ("allow", Some("search")),
            "v4-mapped, root agent"
        );
        let j = w
            .judge(&call("researcher", "127.0.0.1", 81, "allow"))
            .expect("judged");
        assert_eq!(j.verdict, "deny");
        let j = w
            .judge(&call("writer", "127.0.0.1", 80, "allow"))
            .expect("judged");
        assert_eq!(j.reason, "unknown_subject");

        let recs = [
            call("researcher", "127.0.0.1", 80, "allow"),
            call("researcher", "127.0.0.1", 81, "allow"),
            call("researcher", "127.0.0.1", 80, "deny"),
        ];
        let mut sum = WhatIfSummary::default();
        let changed = recs
            .iter()
            .filter(|r| w.judge(r).is_some_and(|now| sum.add(r, &now)))
            .count();
        assert_eq!(changed, 2);
        assert_eq!(
            (
                sum.judged,
                sum.allow_to_deny,
                sum.deny_to_allow,
                sum.changed
            ),
            (3, 1, 1, 2)
        );
    }

    #[test]
    fn filters_select_agent_subtree_pid_verdict_and_time() {
        let mut a = call("researcher", "127.0.0.1", 80, "allow");
        let mut b = call("researcher/summarizer", "127.0.0.1", 81, "deny");
        b.pid = Some(8);
        b.ts = "2026-01-01T00:00:10.000000000Z".into();
        let c = call("writer", "127.0.0.1", 80, "allow");
        let mut gap = AuditRecord::new("gap");
        gap.ts = a.ts.clone();
        a.tool = Some("search".into());
        let f = Filter {
            agent: Some("researcher".into()),
            ..Filter::default()
        };
        assert!(f.matches(&a) && f.matches(&b) && !f.matches(&c) && f.matches(&gap));
        let f = Filter {
            agent: Some("summarizer".into()),
            ..Filter::default()
        };
        assert!(!f.matches(&a) && f.matches(&b));
        let f = Filter {
            pid: Some(8),
            verdict: Some("deny".into()),
            ..Filter::default()
        };
        assert!(!f.matches(&a) && f.matches(&b));
        let f = Filter {
            since: Some("2026-01-01T00:00:05.000000000Z".into()),
            ..Filter::default()
        };
        assert!(!f.matches(&a) && f.matches(&b) && !f.matches(&gap));
        let f = Filter {
            tool: Some("search".into()),
            ..Filter::default()
        };
        assert!(f.matches(&a) && !f.matches(&b));

        let dir = tempfile::tempdir().expect("tempdir");
        write_chain(dir.path(), "acme", &[a, b, c, gap]);
        let lines = tree_lines(dir.path(), &Filter::default());
        let subjects: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("S ")).collect();
        assert_eq!(
            subjects,
            vec![
                "acme/researcher",
                "acme/researcher/summarizer",
                "acme/writer"
            ]
        );
        assert_eq!(lines.iter().filter(|l| l.starts_with("G ")).count(), 1);
        assert_eq!(lines[0], "T ?", "{lines:?}");
    }

    /// Writes records as one chain's current file (replay reads, it does
    /// not check hashes).
    fn write_chain(dir: &Path, chain: &str, records: &[AuditRecord]) {
        let d = dir.join(chain);
        std::fs::create_dir_all(&d).expect("mkdir");
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r).expect("json"));
            text.push('\n');
        }
        std::fs::write(d.join(super::super::LOG_FILE), text).expect("write");
    }

    /// The tree as lines: `T tenant`, `G seq`, `S subject`,
    /// `P pid ppid comm exe`, `R seq`.
    fn tree_lines(dir: &Path, filter: &Filter) -> Vec<String> {
        let trail = Trail::open(dir, filter.tenant.as_deref()).expect("trail");
        let mut lines = Vec::new();
        tree(
            &trail,
            filter,
            &Progress::default(),
            &mut ReadStats::default(),
            |item| {
                lines.push(match item {
                    TreeItem::Tenant(t) => format!("T {t}"),
                    TreeItem::Gap(r) => format!("G {}", r.seq),
                    TreeItem::Subject(s) => format!("S {s}"),
                    TreeItem::Process(p, names) => format!(
                        "P {} {:?} {:?} {:?}",
                        p.pid,
                        p.ppid,
                        p.comm(names),
                        p.exe(names)
                    ),
                    TreeItem::Record(r) => format!("R {}", r.seq),
                });
                Ok(())
            },
        )
        .expect("tree");
        lines
    }

    /// How replay worked before it streamed: every record in memory, the
    /// chains concatenated and stably sorted by time, then grouped.
    fn reference_tree(records: &[AuditRecord]) -> Vec<String> {
        #[derive(Default)]
        struct Proc<'a> {
            pid: u32,
            ppid: Option<u32>,
            comm: Option<&'a str>,
            exe: Option<&'a str>,
            seqs: Vec<u64>,
        }
        #[derive(Default)]
        struct Tenant<'a> {
            gaps: Vec<u64>,
            subjects: std::collections::BTreeMap<&'a str, Vec<Proc<'a>>>,
        }
        let mut tenants: std::collections::BTreeMap<&str, Tenant<'_>> = Default::default();
        let mut index: HashMap<(&str, &str, u32), usize> = HashMap::new();
        for r in records {
            let tenant = r.tenant.as_deref().unwrap_or("?");
            let node = tenants.entry(tenant).or_default();
            if r.kind == "gap" {
                node.gaps.push(r.seq);
                continue;
            }
            let (Some(subject), Some(pid)) = (r.subject.as_deref(), r.pid) else {
                continue;
            };
            let procs = node.subjects.entry(subject).or_default();
            let i = *index.entry((tenant, subject, pid)).or_insert_with(|| {
                procs.push(Proc {
                    pid,
                    ..Proc::default()
                });
                procs.len() - 1
            });
            let p = &mut procs[i];
            p.ppid = p.ppid.or(r.ppid);
            if r.kind == "exec" || p.comm.is_none() {
                p.comm = r.comm.as_deref().or(p.comm);
            }
            if r.kind == "exec" || p.exe.is_none() {
                p.exe = r.exe.as_deref().or(p.exe);
            }
            p.seqs.push(r.seq);
        }
        let mut lines = Vec::new();
        for (t, node) in &tenants {
            lines.push(format!("T {t}"));
            lines.extend(node.gaps.iter().map(|s| format!("G {s}")));
            for (subject, procs) in &node.subjects {
                lines.push(format!("S {subject}"));
                for p in procs {
                    lines.push(format!("P {} {:?} {:?} {:?}", p.pid, p.ppid, p.comm, p.exe));
                    lines.extend(p.seqs.iter().map(|s| format!("R {s}")));
                }
            }
        }
        lines
    }

    /// Three chains of records that a daemon could write: times out of
    /// order within a chain and equal across chains, processes that exec,
    /// gaps, records without a subject.
    fn messy_chains() -> Vec<(String, Vec<AuditRecord>)> {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut chains = Vec::new();
        let mut seq = 0;
        for chain in ["acme", "beta", "_node"] {
            let mut records = Vec::new();
            for _ in 0..400 {
                let kind = ["exec", "connect", "connect", "fork", "exit", "gap"][rand(6) as usize];
                let mut r = AuditRecord::new(kind);
                r.seq = seq;
                seq += 1;
                r.ts = format!("2026-01-01T00:00:{:02}.000000000Z", rand(30));
                if rand(20) == 0 {
                    r.ts = "not a time".into();
                }
                if chain != "_node" || rand(2) == 0 {
                    r.tenant = Some(if rand(10) == 0 { "beta" } else { chain }.to_string());
                }
                let agent = ["researcher", "researcher/summarizer", "writer"][rand(3) as usize];
                if rand(8) != 0 {
                    r.subject = Some(format!("{}/{agent}", r.tenant.as_deref().unwrap_or("?")));
                }
                if rand(10) != 0 {
                    r.pid = Some(100 + rand(12) as u32);
                }
                if rand(3) != 0 {
                    r.ppid = Some(1 + rand(3) as u32);
                }
                if rand(2) == 0 {
                    r.comm = Some(format!("c{}", rand(4)));
                }
                if rand(2) == 0 {
                    r.exe = Some(format!("/bin/e{}", rand(4)));
                }
                r.verdict = Some(["allow", "deny"][rand(2) as usize].to_string());
                records.push(r);
            }
            chains.push((chain.to_string(), records));
        }
        chains
    }

    #[test]
    fn streamed_replay_orders_and_groups_like_the_in_memory_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut chains = messy_chains();
        // The order replay lists chain directories in.
        chains.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, records) in &chains {
            write_chain(dir.path(), name, records);
        }
        let filters = [
            Filter::default(),
            Filter {
                tenant: Some("acme".into()),
                ..Filter::default()
            },
            Filter {
                tenant: Some("_node".into()),
                ..Filter::default()
            },
            Filter {
                verdict: Some("deny".into()),
                agent: Some("summarizer".into()),
                ..Filter::default()
            },
        ];
        for filter in &filters {
            // Chains in name order (`_node` only by name), concatenated,
            // stably sorted by time when more than one.
            let selected: Vec<&AuditRecord> = chains
                .iter()
                .filter(|(name, _)| match &filter.tenant {
                    Some(t) => name == t,
                    None => name != NODE_LOG,
                })
                .flat_map(|(_, rs)| rs)
                .collect();
            let mut want: Vec<AuditRecord> = selected
                .into_iter()
                .filter(|r| filter.matches(r))
                .cloned()
                .collect();
            if filter.tenant.is_none() {
                want.sort_by(|a, b| a.ts.cmp(&b.ts));
            }
            let trail = Trail::open(dir.path(), filter.tenant.as_deref()).expect("trail");
            let mut got = Vec::new();
            stream(
                &trail,
                filter,
                &Progress::default(),
                &mut ReadStats::default(),
                |r| {
                    got.push(r.seq);
                    Ok(())
                },
            )
            .expect("stream");
            let want_seqs: Vec<u64> = want.iter().map(|r| r.seq).collect();
            assert_eq!(got, want_seqs, "{filter:?}");
            assert_eq!(
                tree_lines(dir.path(), filter),
                reference_tree(&want),
                "{filter:?}"
            );
        }
    }

    #[test]
    fn time_keys_order_like_the_time_strings() {
        let times = [
            "",
            "1999",
            "2026-01-01T00:00:00.000000000Z",
            "2026-01-01T00:00:00.000000001Z",
            "2026-01-01T00:00:09.999999999Z",
            "2026-01-01T00:00:10.000000000Z",
            "2026-12-31T23:59:59.999999999Z",
            "2027-01-01T00:00:00.000000000Z",
            "garbage",
        ];
        for w in times.windows(2) {
            assert!(time_key(w[0]) < time_key(w[1]), "{w:?}");
        }
    }

    #[test]
    fn a_missing_tenant_names_the_chains_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_chain(dir.path(), "acme", &[]);
        let e = Trail::open(dir.path(), Some("acne")).expect_err("no such tenant");
        assert!(e.to_string().contains("chains there: acme"), "{e}");
        let e = Trail::open(&dir.path().join("nope"), None).expect_err("no dir");
        assert!(e.to_string().contains("--audit-dir"), "{e}");
    }
}
