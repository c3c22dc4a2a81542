//! The filesystems the daemon stands on: the cgroup2 hierarchy and bpffs.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use thiserror::Error;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Error)]
pub enum FsError {
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); agent-guard needs cgroup v2"
    )]
    NoCgroup2,
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(std::io::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting bpffs at {path}: {source}")]
    MountBpf { path: PathBuf, source: nix::Error },
    #[error("--cgroup-root {path} is not inside the cgroup2 hierarchy mounted at {mount}")]
    NotInCgroup2 { path: PathBuf, mount: PathBuf },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FsError + '_ {
    move |source| FsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where cgroup v2 is mounted (hybrid layouts put it at
/// /sys/fs/cgroup/unified), from mountinfo; never hard-coded.
pub fn cgroup2_mount() -> Result<PathBuf, FsError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(FsError::MountInfo)?;
    parse_cgroup2_mount(&info).ok_or(FsError::NoCgroup2)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The cgroup id the kernel reports for a cgroup2 directory (its inode).
pub fn cgroup_id(dir: &Path) -> Result<u64, FsError> {
    Ok(fs::metadata(dir).map_err(io(dir))?.ino())
}

/// Creates `dir` (and parents) inside the cgroup2 hierarchy.
pub fn ensure_cgroup_dir(mount: &Path, dir: &Path) -> Result<(), FsError> {
    if !dir.starts_with(mount) {
        return Err(FsError::NotInCgroup2 {
            path: dir.to_path_buf(),
            mount: mount.to_path_buf(),
        });
    }
    fs::create_dir_all(dir).map_err(io(dir))
}

/// Moves process `pid` into cgroup `dir`.
pub fn move_to_cgroup(dir: &Path, pid: u32) -> Result<(), FsError> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(io(&procs))
}

/// The cgroup2 path of a process, relative to the hierarchy root.
pub fn process_cgroup(pid: u32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
}

/// The node's conventional bpffs mount point.
const SYS_FS_BPF: &str = "/sys/fs/bpf";

fn is_bpffs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// What [`ensure_bpffs`] did, so shutdown undoes exactly that.
#[derive(Debug, Clone, Copy, Default)]
pub struct BpffsSetup {
    /// A bpffs was mounted at the pin dir itself.
    pub mounted: bool,
    /// The pin dir was created inside an existing bpffs.
    pub created_dir: bool,
}

/// Makes `dir` a directory on bpffs: as is when it already is; created
/// inside `/sys/fs/bpf` (mounting the node's bpffs there first if nothing
/// is, and leaving that mounted, as systemd would); else its own mount.
pub fn ensure_bpffs(dir: &Path) -> Result<BpffsSetup, FsError> {
    if is_bpffs(dir) {
        return Ok(BpffsSetup::default());
    }
    let sys = Path::new(SYS_FS_BPF);
    if dir.starts_with(sys) && !is_bpffs(sys) {
        fs::create_dir_all(sys).map_err(io(sys))?;
        tracing::info!("mounting the node's bpffs at {SYS_FS_BPF}");
        mount_bpffs(sys)?;
    }
    if dir.parent().is_some_and(is_bpffs) {
        fs::create_dir_all(dir).map_err(io(dir))?;
        return Ok(BpffsSetup {
            mounted: false,
            created_dir: true,
        });
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    mount_bpffs(dir)?;
    Ok(BpffsSetup {
        mounted: true,
        created_dir: false,
    })
}

fn mount_bpffs(dir: &Path) -> Result<(), FsError> {
    nix::mount::mount(
        Some("bpffs"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| FsError::MountBpf {
        path: dir.to_path_buf(),
        source,
    })
}

/// Lazily unmounts a bpffs this daemon mounted.
pub fn unmount(dir: &Path) {
    if let Err(e) = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!("unmounting {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_mount_is_found_in_a_hybrid_layout() {
        let info = "25 31 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_gives_none() {
        let info = "25 31 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro\n";
        assert_eq!(parse_cgroup2_mount(info), None);
    }
}
