//! agent-guard-probe: makes one real system call (or a chain of them) and
//! reports the result through its exit status, so tests can run it as a
//! tagged process and check what the kernel allowed.
//!
//! Exit status: 0 the call succeeded, 10 EPERM, 11 any other error,
//! 2 bad usage. Chained forms (`fork`, `thread`, `exec`, `escape-cgroup`)
//! pass through the status of the command they wrap.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    process::exit,
    time::{Duration, Instant},
};

const OK: i32 = 0;
const EPERM: i32 = 10;
const OTHER: i32 = 11;
const USAGE: i32 = 2;

fn report(what: &str, r: std::io::Result<()>) -> i32 {
    match r {
        Ok(()) => {
            println!("probe: {what}: ok");
            OK
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            println!("probe: {what}: EPERM");
            EPERM
        }
        Err(e) => {
            println!("probe: {what}: error: {e}");
            OTHER
        }
    }
}

fn addr(args: &[String]) -> Option<SocketAddr> {
    let ip: IpAddr = args.first()?.parse().ok()?;
    let port: u16 = args.get(1)?.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

fn usage() -> i32 {
    eprintln!(
        "usage: agent-guard-probe CMD ...\n  tcp ADDR PORT | udp-send ADDR PORT | udp-connect ADDR PORT | connect-fd FD ADDR PORT\n  \
         raw | bpf | pid | fork CMD.. | thread CMD.. | exec CMD.. | escape-cgroup CGROUP_DIR CMD..\n  \
         repeat N CMD.. | bench-connect ADDR PORT N"
    );
    USAGE
}

fn run(args: &[String]) -> i32 {
    let Some((cmd, rest)) = args.split_first() else {
        return usage();
    };
    match cmd.as_str() {
        "tcp" => match addr(rest) {
            Some(a) => report(
                "tcp connect",
                TcpStream::connect_timeout(&a, Duration::from_secs(5)).map(drop),
            ),
            None => usage(),
        },
        "udp-send" => match addr(rest) {
            Some(a) => {
                let bind = if a.is_ipv4() {
                    "127.0.0.1:0"
                } else {
                    "[::1]:0"
                };
                report(
                    "udp sendto",
                    UdpSocket::bind(bind)
                        .and_then(|s| s.send_to(b"probe", a))
                        .map(drop),
                )
            }
            None => usage(),
        },
        "udp-connect" => match addr(rest) {
            Some(a) => {
                let bind = if a.is_ipv4() {
                    "127.0.0.1:0"
                } else {
                    "[::1]:0"
                };
                report(
                    "udp connect",
                    UdpSocket::bind(bind)
                        .and_then(|s| s.connect(a).and_then(|()| s.send(b"probe")).map(drop)),
                )
            }
            None => usage(),
        },
        "connect-fd" => {
            // Uses a socket this process did not create (inherited fd).
            let (Some(fd), Some(a)) = (
                rest.first().and_then(|f| f.parse::<i32>().ok()),
                addr(&rest[1..]),
            ) else {
                return usage();
            };
            let sa: socket2_free::SockAddrBytes = socket2_free::encode(&a);
            let rc = unsafe { libc::connect(fd, sa.ptr(), sa.len()) };
            report(
                "connect inherited fd",
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                },
            )
        }
        "raw" => {
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
            let r = if fd >= 0 {
                unsafe { libc::close(fd) };
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            };
            report("raw socket", r)
        }
        "bpf" => {
            // BPF_MAP_CREATE of a tiny array map.
            let mut attr = [0u32; 32];
            attr[0] = 2; // BPF_MAP_TYPE_ARRAY
            attr[1] = 4;
            attr[2] = 4;
            attr[3] = 1;
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    0,
                    attr.as_mut_ptr(),
                    std::mem::size_of_val(&attr),
                )
            };
            let r = if rc >= 0 {
                unsafe { libc::close(rc as i32) };
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            };
            report("bpf(BPF_MAP_CREATE)", r)
        }
        "pid" => {
            println!("{}", std::process::id());
            OK
        }
        "fork" => {
            let _ = std::io::stdout().flush();
            match unsafe { libc::fork() } {
                0 => exit(run(rest)),
                -1 => OTHER,
                child => {
                    let mut status = 0;
                    unsafe { libc::waitpid(child, &mut status, 0) };
                    if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status)
                    } else {
                        OTHER
                    }
                }
            }
        }
        "thread" => {
            let rest = rest.to_vec();
            std::thread::spawn(move || run(&rest))
                .join()
                .unwrap_or(OTHER)
        }
        "exec" => {
            use std::os::unix::process::CommandExt;
            let err = std::process::Command::new("/proc/self/exe")
                .args(rest)
                .exec();
            eprintln!("probe: exec: {err}");
            OTHER
        }
        "escape-cgroup" => {
            let Some((dir, rest)) = rest.split_first() else {
                return usage();
            };
            let r = std::fs::write(
                format!("{dir}/cgroup.procs"),
                std::process::id().to_string(),
            );
            println!(
                "probe: moved self to {dir}: {}",
                if r.is_ok() { "ok" } else { "failed" }
            );
            if r.is_err() {
                return OTHER;
            }
            run(rest)
        }
        "repeat" => {
            let Some(n) = rest.first().and_then(|n| n.parse::<u32>().ok()) else {
                return usage();
            };
            let mut last = OK;
            for _ in 0..n {
                last = run(&rest[1..]);
            }
            last
        }
        "bench-connect" => {
            let (Some(a), Some(n)) = (addr(rest), rest.get(2).and_then(|n| n.parse::<u32>().ok()))
            else {
                return usage();
            };
            let start = Instant::now();
            for _ in 0..n {
                if let Err(e) = TcpStream::connect(a) {
                    eprintln!("probe: bench connect: {e}");
                    return OTHER;
                }
            }
            println!(
                "{}",
                start.elapsed().as_nanos() as f64 / f64::from(n.max(1))
            );
            OK
        }
        _ => usage(),
    }
}

/// Minimal sockaddr encoding for `connect-fd` (std has no public one).
mod socket2_free {
    use std::net::SocketAddr;

    pub struct SockAddrBytes {
        storage: libc::sockaddr_storage,
        len: libc::socklen_t,
    }

    impl SockAddrBytes {
        pub fn ptr(&self) -> *const libc::sockaddr {
            (&self.storage as *const libc::sockaddr_storage).cast()
        }
        pub fn len(&self) -> libc::socklen_t {
            self.len
        }
    }

    pub fn encode(a: &SocketAddr) -> SockAddrBytes {
        // SAFETY: zeroed sockaddr_storage is valid; we write a smaller
        // sockaddr_in/in6 into its start.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin)
                };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6)
                };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        SockAddrBytes {
            storage,
            len: len as libc::socklen_t,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = run(&args);
    let _ = std::io::stdout().flush();
    exit(code);
}
