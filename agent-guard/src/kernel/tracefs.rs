//! Tracepoint field offsets, read from this kernel's tracefs `format` files
//! because they differ between kernel versions.

use std::{fs, path::Path};

use thiserror::Error;

const TRACEFS: &str = "/sys/kernel/tracing";
const TRACEFS_MAGIC: i64 = 0x7472_6163;

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error("mounting tracefs at {TRACEFS}: {0}")]
    Mount(nix::Error),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no field `{field}`; this kernel's tracepoint layout is not supported")]
    MissingField { path: String, field: &'static str },
}

/// Offsets handed to the programs as globals.
#[derive(Debug, Clone, Copy)]
pub struct Offsets {
    pub fork_child_pid: u32,
    pub exec_filename: u32,
    pub exec_old_pid: u32,
    /// `u32::MAX` when the kernel lacks `group_dead` (before 6.x).
    pub exit_group_dead: u32,
}

impl Offsets {
    /// Mounts tracefs if nothing is mounted there yet, then reads the three
    /// format files.
    pub fn read() -> Result<Self, TracefsError> {
        ensure_mounted()?;
        let fork = format("sched_process_fork")?;
        let exec = format("sched_process_exec")?;
        let exit = format("sched_process_exit")?;
        Ok(Self {
            fork_child_pid: field(&fork, "child_pid")?,
            exec_filename: field(&exec, "filename")?,
            exec_old_pid: field(&exec, "old_pid")?,
            exit_group_dead: field(&exit, "group_dead").unwrap_or(u32::MAX),
        })
    }
}

fn is_mounted() -> bool {
    nix::sys::statfs::statfs(TRACEFS)
        .map(|s| s.filesystem_type().0 == TRACEFS_MAGIC)
        .unwrap_or(false)
}

fn ensure_mounted() -> Result<(), TracefsError> {
    if is_mounted() {
        return Ok(());
    }
    // The node-wide tracefs mount point; left mounted (like systemd does),
    // since other daemons may be reading it.
    tracing::info!("mounting tracefs at {TRACEFS}");
    nix::mount::mount(
        Some("tracefs"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .or_else(|e| {
        // Another daemon starting at the same moment mounted it first.
        if e == nix::errno::Errno::EBUSY && is_mounted() {
            Ok(())
        } else {
            Err(TracefsError::Mount(e))
        }
    })
}

struct Format {
    path: String,
    text: String,
}

fn format(event: &str) -> Result<Format, TracefsError> {
    let path = Path::new(TRACEFS)
        .join("events/sched")
        .join(event)
        .join("format");
    let path = path.display().to_string();
    let text = fs::read_to_string(&path).map_err(|source| TracefsError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(Format { path, text })
}

/// Offset of `field` from a line like
/// `field:pid_t child_pid; offset:20; size:4; signed:1;` (tab separated).
fn field(format: &Format, field: &'static str) -> Result<u32, TracefsError> {
    parse_offset(&format.text, field).ok_or_else(|| TracefsError::MissingField {
        path: format.path.clone(),
        field,
    })
}

fn parse_offset(text: &str, field: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit(|c: char| c.is_whitespace()).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        let off = line.split("offset:").nth(1)?.split(';').next()?;
        off.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::parse_offset;

    const EXIT: &str = "name: sched_process_exit\nformat:\n\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";

    #[test]
    fn offsets_are_read_from_the_format_text() {
        assert_eq!(parse_offset(EXIT, "pid"), Some(24));
        assert_eq!(parse_offset(EXIT, "group_dead"), Some(32));
        assert_eq!(parse_offset(EXIT, "comm"), Some(8));
        assert_eq!(parse_offset(EXIT, "prio"), None);
    }

    #[test]
    fn data_loc_fields_are_found() {
        let exec = "\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n";
        assert_eq!(parse_offset(exec, "filename"), Some(8));
    }
}
