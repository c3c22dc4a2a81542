//! Embeds the eBPF object built by `cargo xtask build`, and says which
//! build this is (`agent-guard --version`).
//!
//! The object path comes from `AGENT_GUARD_EBPF_OBJ`, else the place xtask
//! writes it. Without one the daemon still builds (so `cargo check`, clippy
//! and unit tests work on the host alone) and refuses to start with a
//! message that says to run `cargo xtask build`.
//!
//! Sets for the crate:
//! - `AGENT_GUARD_GIT_SHA`: `git rev-parse --short HEAD` of the source tree,
//!   or `unknown` (a source tarball, no git);
//! - `AGENT_GUARD_EBPF_SHA256`: SHA-256 of the embedded object, or `none`.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use sha2::{Digest, Sha256};

fn main() {
    println!("cargo:rerun-if-env-changed=AGENT_GUARD_EBPF_OBJ");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("agent-guard-ebpf.o");
    let default = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/ebpf/bpfel-unknown-none/release/agent-guard-ebpf");
    let src = env::var_os("AGENT_GUARD_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", src.display());
    let object = if src.is_file() {
        fs::read(&src).expect("read the eBPF object")
    } else {
        println!(
            "cargo:warning=no eBPF object at {}; the daemon will refuse to start (run `cargo xtask build`)",
            src.display()
        );
        Vec::new()
    };
    fs::write(&out, &object).expect("write the eBPF object into OUT_DIR");
    let digest = if object.is_empty() {
        "none".to_string()
    } else {
        hex(&Sha256::digest(&object))
    };
    println!("cargo:rustc-env=AGENT_GUARD_EBPF_SHA256={digest}");
    println!("cargo:rustc-env=AGENT_GUARD_GIT_SHA={}", git_sha());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The short commit id, or `unknown`. Re-run when HEAD moves: watch HEAD
/// and the ref it names (and packed-refs, where a ref may live instead).
fn git_sha() -> String {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .current_dir(manifest)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let Some(sha) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(r);
    }
    for name in watch {
        if let Some(p) = git(&["rev-parse", "--git-path", &name]) {
            let p = manifest.join(p);
            // A missing file would make cargo re-run this script every build.
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    sha
}
