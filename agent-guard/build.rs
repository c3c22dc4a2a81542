//! Embeds the eBPF object built by `cargo xtask build`.
//!
//! The object path comes from `AGENT_GUARD_EBPF_OBJ`, else the place xtask
//! writes it. Without one the daemon still builds (so `cargo check`, clippy
//! and unit tests work on the host alone) and refuses to start with a
//! message that says to run `cargo xtask build`.
use std::{env, fs, path::PathBuf};

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
    if src.is_file() {
        fs::copy(&src, &out).expect("copy eBPF object into OUT_DIR");
    } else {
        println!(
            "cargo:warning=no eBPF object at {}; the daemon will refuse to start (run `cargo xtask build`)",
            src.display()
        );
        fs::write(&out, b"").expect("write empty eBPF placeholder");
    }
}
