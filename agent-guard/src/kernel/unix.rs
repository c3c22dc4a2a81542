//! Loading and attaching the Unix socket hooks (`cgroup/connect_unix`,
//! `cgroup/sendmsg_unix`, kernel 6.7+).
//!
//! aya 0.14 has no attach type for them, so aya parses and relocates the
//! object (the programs sit in a section it knows) but never loads these
//! two; here the same object is relocated again with aya-obj against the
//! maps aya created (same fds, so the programs share every map with the
//! others), loaded with `BPF_PROG_LOAD` and the right expected attach type,
//! and attached to the cgroup2 root with `BPF_LINK_CREATE`. Closing the
//! link fds (dropping [`UnixHooks`]) detaches them.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use aya::{Ebpf, maps::Map};
use thiserror::Error;

use super::btf::{Btf, BtfError};

/// `enum bpf_attach_type` values (uapi, stable).
const BPF_CGROUP_UNIX_CONNECT: u32 = 49;
const BPF_CGROUP_UNIX_SENDMSG: u32 = 50;
/// `enum bpf_prog_type`: BPF_PROG_TYPE_CGROUP_SOCK_ADDR.
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `enum bpf_cmd`.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;

/// The programs: (name in the object, attach type, what `status` calls it).
pub const UNIX_PROGRAMS: &[(&str, u32, &str)] = &[
    (
        "connect_unix",
        BPF_CGROUP_UNIX_CONNECT,
        "cgroup/connect_unix",
    ),
    (
        "sendmsg_unix",
        BPF_CGROUP_UNIX_SENDMSG,
        "cgroup/sendmsg_unix",
    ),
];

#[derive(Debug, Error)]
pub enum UnixHookError {
    #[error("reading the kernel's layout of bpf_sock_addr_kern: {0}")]
    Btf(#[from] BtfError),
    #[error("parsing the eBPF object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("relocating the eBPF object: {0}")]
    Relocate(#[from] aya_obj::relocation::EbpfRelocationError),
    #[error("map {0} of the object was not created by the loader")]
    MissingMap(String),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("loading {name}: {source}{log}")]
    Load {
        name: &'static str,
        source: std::io::Error,
        log: String,
    },
    #[error("attaching {name} to the cgroup2 root: {source}")]
    Attach {
        name: &'static str,
        source: std::io::Error,
    },
}

/// Where the hook finds the caller's address in its context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub uaddr_off: u32,
    pub uaddrlen_off: u32,
}

impl Layout {
    /// From the running kernel's BTF; an error on kernels without the
    /// `uaddrlen` field (before 6.7, which also lack the hooks).
    pub fn from_kernel() -> Result<Self, UnixHookError> {
        let btf = Btf::from_sys_fs()?;
        let o = btf.member_offsets("bpf_sock_addr_kern", &["uaddr", "uaddrlen"])?;
        Ok(Self {
            uaddr_off: o["uaddr"],
            uaddrlen_off: o["uaddrlen"],
        })
    }
}

/// The loaded programs and their links; dropping detaches and unloads
/// (unless the links are pinned).
pub struct UnixHooks {
    _links: Vec<OwnedFd>,
    _progs: Vec<OwnedFd>,
    /// (status name, kernel program id).
    pub ids: Vec<(String, u32)>,
    pub attached: Vec<String>,
}

impl UnixHooks {
    /// (program name, link fd) of each attached hook, to pin.
    pub fn links(&self) -> Vec<(&'static str, BorrowedFd<'_>)> {
        UNIX_PROGRAMS
            .iter()
            .map(|(n, _, _)| *n)
            .zip(self._links.iter().map(|l| l.as_fd()))
            .collect()
    }
}

fn map_data_fd(map: &Map) -> BorrowedFd<'_> {
    let data = match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    };
    data.fd().as_fd()
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `cmd`,
    // zero-filled past the fields we set; the kernel copies `size` bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`, padded.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _rest: [u64; 8],
}

/// `union bpf_attr` for BPF_LINK_CREATE (no attach-type specific part).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 6],
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn load_program(
    name: &'static str,
    attach_type: u32,
    insns: &[aya_obj::generated::bpf_insn],
    license: &CString,
) -> Result<OwnedFd, UnixHookError> {
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let attempt = |log: Option<&mut Vec<u8>>| {
        let (log_level, log_size, log_buf) = match log {
            Some(buf) => (1, buf.len() as u32, buf.as_mut_ptr() as u64),
            None => (0, 0, 0),
        };
        let mut attr = ProgLoadAttr {
            prog_type: PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level,
            log_size,
            log_buf,
            kern_version: 0,
            prog_flags: 0,
            prog_name,
            prog_ifindex: 0,
            expected_attach_type: attach_type,
            _rest: [0; 8],
        };
        sys_bpf(BPF_PROG_LOAD, &mut attr)
    };
    match attempt(None) {
        // SAFETY: the kernel returned a new fd that we now own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
        Err(source) => {
            // Again with the verifier's log, for the error message.
            let mut buf = vec![0u8; 1 << 20];
            let _ = attempt(Some(&mut buf));
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            let text = String::from_utf8_lossy(&buf[..end]);
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            let log = if tail.is_empty() {
                String::new()
            } else {
                let mut t = tail;
                t.reverse();
                format!("\nverifier log (end):\n{}", t.join("\n"))
            };
            Err(UnixHookError::Load { name, source, log })
        }
    }
}

fn program_id(fd: BorrowedFd<'_>) -> Option<u32> {
    // struct bpf_prog_info starts with type (u32), id (u32).
    let mut info = [0u8; 256];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).ok()?;
    Some(u32::from_ne_bytes([info[4], info[5], info[6], info[7]]))
}

/// `union bpf_attr` for BPF_OBJ_PIN and BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    _rest: [u64; 2],
}

fn obj_call(cmd: libc::c_long, path: &std::path::Path, fd: u32) -> std::io::Result<libc::c_long> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("pin path has a NUL byte"))?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd,
        ..Default::default()
    };
    sys_bpf(cmd, &mut attr)
}

/// `BPF_OBJ_PIN`: pins the object behind `fd` at `path` on a bpffs.
pub fn pin_object(fd: BorrowedFd<'_>, path: &std::path::Path) -> std::io::Result<()> {
    const BPF_OBJ_PIN: libc::c_long = 6;
    obj_call(BPF_OBJ_PIN, path, fd.as_raw_fd() as u32).map(drop)
}

/// `BPF_OBJ_GET`: opens the object pinned at `path`.
pub fn get_object(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    let fd = obj_call(BPF_OBJ_GET, path, 0)?;
    // SAFETY: a new fd from the kernel, now ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Relocates `object` against the maps `ebpf` created from it, loads the
/// Unix programs and attaches them to `cgroup_root`.
pub fn attach(
    ebpf: &Ebpf,
    object: &[u8],
    cgroup_root: BorrowedFd<'_>,
) -> Result<UnixHooks, UnixHookError> {
    let mut obj = aya_obj::Object::parse(object)?;
    let mut fds: HashMap<String, RawFd> = HashMap::new();
    for name in obj.maps.keys() {
        let map = ebpf
            .map(name)
            .ok_or_else(|| UnixHookError::MissingMap(name.clone()))?;
        fds.insert(name.clone(), map_data_fd(map).as_raw_fd());
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    let maps: Vec<(String, RawFd, aya_obj::Map)> = obj
        .maps
        .iter()
        .map(|(n, m)| (n.clone(), fds[n], m.clone()))
        .collect();
    obj.relocate_maps(
        maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
        &text_sections,
    )?;
    obj.relocate_calls(&text_sections)?;

    let mut progs = Vec::new();
    let mut links = Vec::new();
    let mut ids = Vec::new();
    let mut attached = Vec::new();
    for &(name, attach_type, label) in UNIX_PROGRAMS {
        let prog = obj
            .programs
            .get(name)
            .ok_or(UnixHookError::MissingProgram(name))?;
        let func = obj
            .functions
            .get(&prog.function_key())
            .ok_or(UnixHookError::MissingProgram(name))?;
        let fd = load_program(name, attach_type, &func.instructions, &prog.license)?;
        let mut attr = LinkCreateAttr {
            prog_fd: fd.as_raw_fd() as u32,
            target_fd: cgroup_root.as_raw_fd() as u32,
            attach_type,
            ..Default::default()
        };
        let link = sys_bpf(BPF_LINK_CREATE, &mut attr)
            .map_err(|source| UnixHookError::Attach { name, source })?;
        // SAFETY: a new fd from the kernel, now ours.
        links.push(unsafe { OwnedFd::from_raw_fd(link as RawFd) });
        if let Some(id) = program_id(fd.as_fd()) {
            ids.push((name.to_string(), id));
        }
        progs.push(fd);
        attached.push(label.to_string());
    }
    Ok(UnixHooks {
        _links: links,
        _progs: progs,
        ids,
        attached,
    })
}
