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
/// `resolve`: the server answered REFUSED.
const REFUSED: i32 = 12;

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

/// CPU time (user + system) this process has used so far, in ns, from
/// getrusage(RUSAGE_SELF); 0 if the call fails.
fn cpu_time_ns() -> u64 {
    // SAFETY: rusage is plain data; getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an owned rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let tv = |t: libc::timeval| -> u64 {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_usec).unwrap_or(0) * 1000
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs `op` `n` times; prints mean wall ns and CPU ns per call (the
/// bench-connect format).
fn timed(n: u32, mut op: impl FnMut() -> std::io::Result<()>) -> i32 {
    let cpu_start = cpu_time_ns();
    let start = Instant::now();
    for _ in 0..n {
        if let Err(e) = op() {
            eprintln!("probe: bench: {e}");
            return OTHER;
        }
    }
    let wall = start.elapsed();
    let cpu = cpu_time_ns().saturating_sub(cpu_start);
    println!(
        "{} {}",
        wall.as_nanos() as f64 / f64::from(n.max(1)),
        cpu as f64 / f64::from(n.max(1))
    );
    OK
}

/// One blocking TCP connect, then close(2) with SO_LINGER 0.
fn connect_rst(fam: libc::c_int, sa: &socket2_free::SockAddrBytes) -> std::io::Result<()> {
    // SAFETY: plain system calls on an fd this function owns and closes;
    // `sa` and `linger` outlive the calls that read them.
    unsafe {
        let fd = libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let result = if libc::connect(fd, sa.ptr(), sa.len()) == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
        libc::close(fd);
        result
    }
}

/// [`resolve`] without its report line (for the timed loop).
fn resolve_quiet(mode: &str, name: &str, to: SocketAddr) -> i32 {
    QUIET.store(true, std::sync::atomic::Ordering::Relaxed);
    resolve(mode, name, to)
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One A query for `name` to `server`:53 over `mode` (`udp`: sendto and
/// recvfrom, checking the reply comes from the server asked; `udp-connected`:
/// connect then send, as glibc does; `tcp`). Prints the addresses.
fn resolve(mode: &str, name: &str, to: SocketAddr) -> i32 {
    let what = format!("resolve {mode} {name} @{to}");
    let server = to.ip();
    let mut q = vec![0x4a, 0x47, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let reply: std::io::Result<Vec<u8>> = (|| {
        let timeout = Some(Duration::from_secs(5));
        let mut buf = vec![0u8; 4096];
        match mode {
            "udp" | "udp-connected" => {
                let bind = if server.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let s = UdpSocket::bind(bind)?;
                s.set_read_timeout(timeout)?;
                if mode == "udp" {
                    s.send_to(&q, to)?;
                    let (n, from) = s.recv_from(&mut buf)?;
                    if from != to {
                        return Err(std::io::Error::other(format!(
                            "reply from {from}, asked {to}"
                        )));
                    }
                    buf.truncate(n);
                } else {
                    s.connect(to)?;
                    s.send(&q)?;
                    let n = s.recv(&mut buf)?;
                    buf.truncate(n);
                }
                Ok(buf)
            }
            "tcp" => {
                use std::io::Read;
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
                s.set_read_timeout(timeout)?;
                let mut framed = (q.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&q);
                s.write_all(&framed)?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len)?;
                let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                s.read_exact(&mut msg)?;
                Ok(msg)
            }
            _ => Err(std::io::Error::other("mode is udp, udp-connected or tcp")),
        }
    })();
    let reply = match reply {
        Ok(r) => r,
        Err(e) => return report(&what, Err(e)),
    };
    if reply.len() < 12 || reply[0..2] != q[0..2] {
        println!("probe: {what}: error: bad reply");
        return OTHER;
    }
    match reply[3] & 0x0f {
        0 => {}
        5 => {
            println!("probe: {what}: REFUSED");
            return REFUSED;
        }
        rcode => {
            println!("probe: {what}: error: rcode {rcode}");
            return OTHER;
        }
    }
    // Skip the question, then read A records (compressed names only).
    let mut i = q.len();
    let mut addrs = Vec::new();
    while i + 12 <= reply.len() {
        let (rtype, rdlen) = (
            u16::from_be_bytes([reply[i + 2], reply[i + 3]]),
            u16::from_be_bytes([reply[i + 10], reply[i + 11]]) as usize,
        );
        let data = i + 12;
        if rtype == 1 && rdlen == 4 && data + 4 <= reply.len() {
            addrs.push(std::net::Ipv4Addr::new(
                reply[data],
                reply[data + 1],
                reply[data + 2],
                reply[data + 3],
            ));
        }
        i = data + rdlen;
    }
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        println!("probe: {what}: ok {}", list.join(" "));
    }
    if addrs.is_empty() { OTHER } else { OK }
}

/// Connects a stream socket to (`stream`), or sends one datagram from an
/// unbound socket to, the Unix socket `path` (`@name`: abstract).
fn unix_call(stream: bool, path: &str) -> std::io::Result<()> {
    use std::os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr as UnixAddr, UnixDatagram, UnixStream},
    };
    let addr = match path.strip_prefix('@') {
        Some(name) => UnixAddr::from_abstract_name(name.as_bytes())?,
        None => UnixAddr::from_pathname(path)?,
    };
    if stream {
        UnixStream::connect_addr(&addr).map(drop)
    } else {
        UnixDatagram::unbound()?
            .send_to_addr(b"probe", &addr)
            .map(drop)
    }
}

fn usage() -> i32 {
    eprintln!(
        "usage: agent-guard-probe CMD ...\n  tcp ADDR PORT | tcp-call ADDR PORT | udp-send ADDR PORT | udp-connect ADDR PORT | connect-fd FD ADDR PORT\n  \
         unix PATH | unix-dgram PATH   (PATH @name: abstract)\n  \
         resolve udp|udp-connected|tcp NAME SERVER_IP [PORT]   (exit 12: REFUSED)\n  \
         bench-unix PATH N | bench-resolve SERVER_IP PORT NAME N   (print WALL_NS CPU_NS per call)\n  \
         bench-tcp-rst ADDR PORT N | bench-sendto ADDR PORT N   (same output)\n  \
         raw | bpf | pid | fork CMD.. | thread CMD.. | exec CMD.. | escape-cgroup CGROUP_DIR CMD..\n  \
         repeat N CMD.. | bench-connect ADDR PORT N | watch-connect ADDR PORT DURATION_MS [SPACING_NS]\n{}",
        escape::USAGE
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
        // Connect, read the server's one-line answer, print it.
        "tcp-call" => match addr(rest) {
            Some(a) => report(
                "tcp call",
                TcpStream::connect_timeout(&a, Duration::from_secs(5)).and_then(|s| {
                    use std::io::BufRead as _;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let mut line = String::new();
                    std::io::BufReader::new(s).read_line(&mut line)?;
                    print!("{line}");
                    Ok(())
                }),
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
        "unix" | "unix-dgram" => match rest.first() {
            Some(path) => report(&format!("{cmd} {path}"), unix_call(cmd == "unix", path)),
            None => usage(),
        },
        "resolve" => match (
            rest.first(),
            rest.get(1),
            rest.get(2).and_then(|a| a.parse().ok()),
        ) {
            (Some(mode), Some(name), Some(server)) => {
                let port = rest.get(3).and_then(|p| p.parse().ok()).unwrap_or(53);
                resolve(mode, name, SocketAddr::new(server, port))
            }
            _ => usage(),
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
        "exec-sh" => {
            // Replace this process with `/bin/sh -c SCRIPT`.
            use std::os::unix::process::CommandExt;
            let Some(script) = rest.first() else {
                return usage();
            };
            let err = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(script)
                .exec();
            eprintln!("probe: exec sh: {err}");
            OTHER
        }
        "threads-exit-then" => {
            // Start and end a few threads first: their exits must not
            // untag the process.
            for _ in 0..4 {
                let _ = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(5))).join();
            }
            run(rest)
        }
        "control-dead-peer" => {
            // Connect to the daemon's control socket from a child that then
            // exits, and use the inherited connection (MODE `parent-writes`)
            // or let the child write the request and exit at once
            // (`child-writes`). 0: the daemon answered ok, 10: refused.
            use std::io::{BufRead, BufReader};
            use std::os::unix::net::UnixStream;
            let (Some(sock), Some(req), Some(mode)) = (rest.first(), rest.get(1), rest.get(2))
            else {
                return usage();
            };
            let child_writes = mode == "child-writes";
            let mut pair = [0i32; 2];
            // A channel to pass the connected fd from child to parent.
            if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) }
                != 0
            {
                return OTHER;
            }
            let _ = std::io::stdout().flush();
            match unsafe { libc::fork() } {
                0 => {
                    // `@name`: the daemon's abstract name (how tagged
                    // processes reach it).
                    let conn = match sock.strip_prefix('@') {
                        Some(name) => {
                            use std::os::linux::net::SocketAddrExt;
                            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                                .and_then(|a| UnixStream::connect_addr(&a))
                        }
                        None => UnixStream::connect(sock),
                    };
                    let Ok(mut conn) = conn else {
                        unsafe { libc::_exit(OTHER) }
                    };
                    if child_writes {
                        let _ = conn.write_all(format!("{req}\n").as_bytes());
                    }
                    // Hand the connection to the parent, then exit.
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&conn);
                    let _ = pass_fd(pair[1], fd);
                    unsafe { libc::_exit(0) }
                }
                -1 => OTHER,
                child => {
                    // Our copy of the child's end, closed so a child that
                    // exits without sending (its connect was refused)
                    // ends the wait below instead of hanging it.
                    unsafe { libc::close(pair[1]) };
                    let Some(fd) = recv_fd(pair[0]) else {
                        let mut status = 0;
                        unsafe { libc::waitpid(child, &mut status, 0) };
                        return OTHER;
                    };
                    let mut status = 0;
                    unsafe { libc::waitpid(child, &mut status, 0) };
                    std::thread::sleep(Duration::from_millis(100));
                    let mut conn =
                        unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                    if !child_writes && conn.write_all(format!("{req}\n").as_bytes()).is_err() {
                        return OTHER;
                    }
                    let mut reply = String::new();
                    let _ = BufReader::new(&conn).read_line(&mut reply);
                    println!("probe: control reply: {}", reply.trim());
                    if reply.contains("\"ok\":true") {
                        OK
                    } else {
                        EPERM
                    }
                }
            }
        }
        "after" => {
            // Sleep MS milliseconds, then run the rest (a process that was
            // started earlier and calls later).
            let Some(ms) = rest.first().and_then(|m| m.parse::<u64>().ok()) else {
                return usage();
            };
            std::thread::sleep(Duration::from_millis(ms));
            run(&rest[1..])
        }
        "socket-family" => {
            // socket(FAMILY, SOCK_STREAM or SOCK_DGRAM, 0): only creation.
            let Some(family) = rest.first().and_then(|f| f.parse::<i32>().ok()) else {
                return usage();
            };
            let ty = match rest.get(1).map(String::as_str) {
                Some("dgram") => libc::SOCK_DGRAM,
                Some("seqpacket") => libc::SOCK_SEQPACKET,
                _ => libc::SOCK_STREAM,
            };
            let proto = rest.get(2).and_then(|p| p.parse::<i32>().ok()).unwrap_or(0);
            let fd = unsafe { libc::socket(family, ty, proto) };
            let r = if fd >= 0 {
                unsafe { libc::close(fd) };
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            };
            report(&format!("socket({family})"), r)
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
            // Mean wall ns per connect, then this process's CPU time
            // (user + sys, getrusage) per connect.
            let (Some(a), Some(n)) = (addr(rest), rest.get(2).and_then(|n| n.parse::<u32>().ok()))
            else {
                return usage();
            };
            timed(n, || TcpStream::connect(a).map(drop))
        }
        "bench-tcp-rst" => {
            // socket + blocking connect + close with SO_LINGER 0 (an RST, so
            // no TIME_WAIT port is left behind): what a client pays per
            // call, without ephemeral-port pressure across samples.
            let (Some(a), Some(n)) = (addr(rest), rest.get(2).and_then(|n| n.parse::<u32>().ok()))
            else {
                return usage();
            };
            let sa = socket2_free::encode(&a);
            let fam = if a.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            timed(n, || connect_rst(fam, &sa))
        }
        "bench-sendto" => {
            // One unconnected UDP socket, N sendto(2) of 64 bytes.
            let (Some(a), Some(n)) = (addr(rest), rest.get(2).and_then(|n| n.parse::<u32>().ok()))
            else {
                return usage();
            };
            let bind: SocketAddr = if a.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(socket) = std::net::UdpSocket::bind(bind) else {
                return OTHER;
            };
            let payload = [0x5a_u8; 64];
            timed(n, || socket.send_to(&payload, a).map(drop))
        }
        "bench-unix" => {
            let (Some(path), Some(n)) = (
                rest.first(),
                rest.get(1).and_then(|n| n.parse::<u32>().ok()),
            ) else {
                return usage();
            };
            timed(n, || unix_call(true, path))
        }
        "bench-resolve" => {
            let (Some(a), Some(name), Some(n)) = (
                addr(rest),
                rest.get(2),
                rest.get(3).and_then(|n| n.parse::<u32>().ok()),
            ) else {
                return usage();
            };
            timed(n, || match resolve_quiet("udp-connected", name, a) {
                OK => Ok(()),
                code => Err(std::io::Error::other(format!("resolve exit {code}"))),
            })
        }
        "watch-connect" => watch::run(rest).unwrap_or_else(usage),
        other => escape::run(other, rest).unwrap_or_else(usage),
    }
}

/// `watch-connect ADDR PORT DURATION_MS [SPACING_NS]`: TCP connects to
/// ADDR:PORT in a loop for DURATION_MS and reports every change of verdict,
/// for `cargo xtask bench` (grant/revoke enforcement latency).
///
/// Output: `# started T_NS` at once (flushed, so the caller knows the loop
/// runs), then at exit, for every verdict change, a line `T_NS allow|deny`
/// (CLOCK_MONOTONIC ns just before the connect(2) that first saw the new
/// verdict; EPERM = deny, success = allow) followed by `# previous_attempt_ns
/// P` (the same stamp of the attempt before it, which still saw the old
/// verdict, or 0),
/// and a summary line `# attempts N errors E elapsed_ns X max_gap_ns G`.
/// Lines are kept in memory and printed at the end so that writing them does
/// not stretch the loop. Connects are non-blocking and each socket is closed
/// at once with SO_LINGER 0 (RST), so no TIME_WAIT ports pile up. SPACING_NS (default 0, a tight loop) spaces the
/// attempts' starts by busy-waiting. Other connect errors are counted, not
/// verdicts; the exit status is 0, or 11 when every attempt failed so.
mod watch {
    use std::io::Write as _;

    use super::{OK, OTHER, addr, socket2_free};

    fn mono_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// One non-blocking connect: Ok(true) when it was let through (connected
    /// or EINPROGRESS; the verdict is taken before the SYN is sent), Ok(false)
    /// for EPERM, Err(errno) else. Non-blocking, so a SYN dropped by a full
    /// accept queue cannot stall the loop for a 1 s retransmit. `*stamp` is
    /// set to CLOCK_MONOTONIC just before connect(2) is entered.
    fn attempt(
        fam: libc::c_int,
        sa: &socket2_free::SockAddrBytes,
        stamp: &mut u64,
    ) -> Result<bool, i32> {
        // SAFETY: plain syscalls on an fd this function owns and closes.
        unsafe {
            let fd = libc::socket(
                fam,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
            }
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            *stamp = mono_ns();
            let rc = libc::connect(fd, sa.ptr(), sa.len());
            let err = std::io::Error::last_os_error().raw_os_error().unwrap_or(-1);
            libc::close(fd);
            match rc {
                0 => Ok(true),
                _ if err == libc::EINPROGRESS => Ok(true),
                _ if err == libc::EPERM => Ok(false),
                _ => Err(err),
            }
        }
    }

    pub fn run(rest: &[String]) -> Option<i32> {
        let a = addr(rest)?;
        let duration_ms: u64 = rest.get(2)?.parse().ok()?;
        let spacing_ns: u64 = match rest.get(3) {
            Some(s) => s.parse().ok()?,
            None => 0,
        };
        let fam = if a.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let sa = socket2_free::encode(&a);
        let t0 = mono_ns();
        let end = t0.saturating_add(duration_ms.saturating_mul(1_000_000));
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "# started {t0}");
            let _ = out.flush();
        }
        // (start, previous start, allowed)
        let mut changes: Vec<(u64, u64, bool)> = Vec::new();
        let mut verdict: Option<bool> = None;
        let mut prev_start = 0u64;
        let mut attempts = 0u64;
        let mut errors: std::collections::BTreeMap<i32, u64> = Default::default();
        let mut max_gap = 0u64;
        let mut next = t0;
        loop {
            let mut start = mono_ns();
            if spacing_ns > 0 {
                while start < next {
                    std::hint::spin_loop();
                    start = mono_ns();
                }
                next = start + spacing_ns;
            }
            if start >= end {
                break;
            }
            let mut stamp = start;
            match attempt(fam, &sa, &mut stamp) {
                Ok(v) => {
                    if verdict != Some(v) {
                        changes.push((stamp, prev_start, v));
                        verdict = Some(v);
                    }
                }
                Err(e) => *errors.entry(e).or_default() += 1,
            }
            if attempts > 0 {
                max_gap = max_gap.max(stamp.saturating_sub(prev_start));
            }
            prev_start = stamp;
            attempts += 1;
        }
        let elapsed = mono_ns() - t0;
        let mut out = std::io::stdout().lock();
        for (t, p, v) in &changes {
            let _ = writeln!(out, "{t} {}", if *v { "allow" } else { "deny" });
            let _ = writeln!(out, "# previous_attempt_ns {p}");
        }
        let failed: u64 = errors.values().sum();
        for (e, n) in &errors {
            let _ = writeln!(
                out,
                "# error {n} x {}",
                std::io::Error::from_raw_os_error(*e)
            );
        }
        let _ = writeln!(
            out,
            "# attempts {attempts} errors {failed} elapsed_ns {elapsed} max_gap_ns {max_gap}"
        );
        let _ = out.flush();
        Some(if attempts > 0 && failed == attempts {
            OTHER
        } else {
            OK
        })
    }
}

/// Sends `fd` over the Unix socket `over` (SCM_RIGHTS).
fn pass_fd(over: i32, fd: i32) -> bool {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let byte = [0u8; 1];
    let iov = [std::io::IoSlice::new(&byte)];
    let fds = [fd];
    sendmsg::<()>(
        over,
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .is_ok()
}

/// Receives one fd sent by [`pass_fd`].
fn recv_fd(over: i32) -> Option<i32> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut cmsg = nix::cmsg_space!([i32; 1]);
    let msg = recvmsg::<()>(over, &mut iov, Some(&mut cmsg), MsgFlags::empty()).ok()?;
    msg.cmsgs().ok()?.find_map(|c| match c {
        ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
        _ => None,
    })
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

/// Subcommands that try the escape paths an attacker inside a tagged
/// process would try (tests/tests/escape.rs). Same exit-status contract.
mod escape {
    use std::{
        io::{self, BufRead, BufReader, Write},
        net::SocketAddr,
        os::unix::net::UnixListener,
        time::Duration,
    };

    use super::{OK, OTHER, addr, report, run as run_cmd, socket2_free};

    pub const USAGE: &str = "  uring-connect ADDR PORT [inline|async|sqpoll] | tfo ADDR PORT | mptcp ADDR PORT\n  \
         uring-connect-unix PATH | unix-nul PATH SUFFIX (connect to PATH\\0SUFFIX, full length)\n  \
         udp-sendmmsg ADDR PORT.. | udp-pktinfo ADDR PORT | udp6-send ADDR PORT | udp-connected-sendto ADDR CPORT DPORT\n  \
         tcp-reconnect ADDR APORT DPORT | tcp-bind ADDR PORT | ping ADDR | vsock-connect CID PORT\n  \
         ptrace-attach PID | process-vm-read PID | pidfd-getfd PID FD | proc-mem PID\n  \
         kill PID SIG CMD.. | write-file PATH VALUE CMD.. | fake-daemon SOCKET\n  \
         orphan CMD.. | spawn CMD.. | exec-from-thread CMD.. | leader-exit CMD..";

    fn cvt(rc: libc::c_long) -> io::Result<libc::c_long> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    fn family(a: &SocketAddr) -> libc::c_int {
        if a.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        }
    }

    /// An owned fd closed on drop.
    struct Fd(libc::c_int);

    impl Drop for Fd {
        fn drop(&mut self) {
            // SAFETY: we own the descriptor.
            unsafe { libc::close(self.0) };
        }
    }

    fn socket(fam: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<Fd> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(fam, ty | libc::SOCK_CLOEXEC, proto) };
        cvt(fd.into()).map(|_| Fd(fd))
    }

    fn connect(fd: &Fd, a: &SocketAddr) -> io::Result<()> {
        let sa = socket2_free::encode(a);
        // SAFETY: sa is a valid sockaddr of sa.len() bytes.
        cvt(unsafe { libc::connect(fd.0, sa.ptr(), sa.len()) }.into()).map(drop)
    }

    fn bind_any(fd: &Fd, a: &SocketAddr) -> io::Result<()> {
        let local: SocketAddr = if a.is_ipv4() {
            "127.0.0.1:0".parse().expect("addr")
        } else {
            "[::1]:0".parse().expect("addr")
        };
        let sa = socket2_free::encode(&local);
        // SAFETY: as above.
        cvt(unsafe { libc::bind(fd.0, sa.ptr(), sa.len()) }.into()).map(drop)
    }

    fn pid_arg(rest: &[String]) -> Option<libc::pid_t> {
        rest.first()?.parse().ok()
    }

    /// `None`: unknown subcommand or bad arguments (usage).
    pub fn run(cmd: &str, rest: &[String]) -> Option<i32> {
        Some(match cmd {
            "uring-connect" => {
                let a = addr(rest)?;
                let mode = rest.get(2).map(String::as_str).unwrap_or("inline");
                if !matches!(mode, "inline" | "async" | "sqpoll") {
                    return None;
                }
                report(
                    &format!("io_uring connect ({mode})"),
                    uring_connect(a, mode),
                )
            }
            "uring-connect-unix" => {
                let path = rest.first()?;
                report(
                    &format!("io_uring connect unix {path}"),
                    uring_connect_unix(path),
                )
            }
            "unix-nul" => {
                let (path, suffix) = (rest.first()?, rest.get(1)?);
                report(
                    &format!("unix connect {path}\\0{suffix}"),
                    unix_connect_raw(path.as_bytes(), suffix.as_bytes()),
                )
            }
            "tfo" => {
                let a = addr(rest)?;
                report("sendto(MSG_FASTOPEN)", tfo(a))
            }
            "mptcp" => {
                let a = addr(rest)?;
                report(
                    "mptcp connect",
                    socket(family(&a), libc::SOCK_STREAM, libc::IPPROTO_MPTCP)
                        .and_then(|fd| connect(&fd, &a)),
                )
            }
            "udp-sendmmsg" => {
                let a = addr(rest)?;
                let ports: Vec<u16> = rest[1..].iter().filter_map(|p| p.parse().ok()).collect();
                report("udp sendmmsg", sendmmsg(a, &ports))
            }
            "udp-pktinfo" => {
                let a = addr(rest)?;
                report("udp sendmsg with IP_PKTINFO", pktinfo(a))
            }
            "udp6-send" => {
                let a = addr(rest)?;
                report(
                    "udp sendto from an AF_INET6 socket",
                    std::net::UdpSocket::bind("[::]:0")
                        .and_then(|s| s.send_to(b"probe", a))
                        .map(drop),
                )
            }
            "udp-connected-sendto" => {
                let a = addr(rest)?;
                let dport: u16 = rest.get(2)?.parse().ok()?;
                let bind = if a.is_ipv4() {
                    "127.0.0.1:0"
                } else {
                    "[::1]:0"
                };
                let s = match std::net::UdpSocket::bind(bind).and_then(|s| {
                    s.connect(a)?;
                    Ok(s)
                }) {
                    Ok(s) => s,
                    Err(e) => {
                        println!("probe: connecting to the allowed endpoint failed: {e}");
                        return Some(OTHER);
                    }
                };
                report(
                    "sendto another endpoint on a connected udp socket",
                    s.send_to(b"probe", SocketAddr::new(a.ip(), dport))
                        .map(drop),
                )
            }
            "tcp-reconnect" => {
                let a = addr(rest)?;
                let dport: u16 = rest.get(2)?.parse().ok()?;
                report("tcp reconnect after AF_UNSPEC", reconnect(a, dport))
            }
            "tcp-bind" => {
                let a = addr(rest)?;
                report(
                    "tcp bind then connect",
                    socket(family(&a), libc::SOCK_STREAM, 0).and_then(|fd| {
                        bind_any(&fd, &a)?;
                        connect(&fd, &a)
                    }),
                )
            }
            "ping" => {
                let ip: std::net::IpAddr = rest.first()?.parse().ok()?;
                report("icmp echo on a ping socket", ping(ip))
            }
            "vsock-connect" => {
                let cid: u32 = rest.first()?.parse().ok()?;
                let port: u32 = rest.get(1)?.parse().ok()?;
                report("vsock connect", vsock_connect(cid, port))
            }
            "ptrace-attach" => {
                let pid = pid_arg(rest)?;
                report("ptrace(PTRACE_ATTACH)", ptrace_attach(pid))
            }
            "process-vm-read" => {
                let pid = pid_arg(rest)?;
                report("process_vm_readv", process_vm_read(pid))
            }
            "pidfd-getfd" => {
                let pid = pid_arg(rest)?;
                let fd: libc::c_int = rest.get(1)?.parse().ok()?;
                report("pidfd_getfd", pidfd_getfd(pid, fd))
            }
            "proc-mem" => {
                let pid = pid_arg(rest)?;
                report(
                    "open /proc/PID/mem for writing",
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(format!("/proc/{pid}/mem"))
                        .map(drop),
                )
            }
            "kill" => {
                let pid = pid_arg(rest)?;
                let sig: libc::c_int = rest.get(1)?.parse().ok()?;
                // SAFETY: plain syscall.
                let r = cvt(unsafe { libc::kill(pid, sig) }.into()).map(drop);
                let code = report(&format!("kill({pid}, {sig})"), r);
                if code != OK {
                    return Some(code);
                }
                // Let the target die and its kernel objects be released.
                std::thread::sleep(Duration::from_millis(1500));
                run_cmd(&rest[2..])
            }
            "tkill" | "pidfd-kill" => {
                // tkill(TID, SIG), or open("/proc/PID") + pidfd_send_signal.
                let pid = pid_arg(rest)?;
                let sig: libc::c_int = rest.get(1)?.parse().ok()?;
                let r = if cmd == "tkill" {
                    // SAFETY: plain syscall.
                    cvt(unsafe { libc::syscall(libc::SYS_tkill, pid, sig) }).map(drop)
                } else {
                    std::fs::File::open(format!("/proc/{pid}")).and_then(|f| {
                        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
                        // SAFETY: plain syscall on a pidfd we own.
                        cvt(unsafe {
                            libc::syscall(
                                libc::SYS_pidfd_send_signal,
                                fd,
                                sig,
                                std::ptr::null::<libc::siginfo_t>(),
                                0,
                            )
                        })
                        .map(drop)
                    })
                };
                let code = report(&format!("{cmd}({pid}, {sig})"), r);
                if code != OK {
                    return Some(code);
                }
                std::thread::sleep(Duration::from_millis(1500));
                run_cmd(&rest[2..])
            }
            "write-file" => {
                let (path, value) = (rest.first()?, rest.get(1)?);
                let code = report(&format!("write {path}"), std::fs::write(path, value));
                if code != OK {
                    return Some(code);
                }
                run_cmd(&rest[2..])
            }
            "fake-daemon" => {
                let path = rest.first()?;
                fake_daemon(path)
            }
            "orphan" => orphan(rest),
            "spawn" => spawn(rest),
            "exec-from-thread" => {
                let rest = rest.to_vec();
                std::thread::spawn(move || {
                    use std::os::unix::process::CommandExt;
                    let err = std::process::Command::new("/proc/self/exe")
                        .args(&rest)
                        .exec();
                    println!("probe: exec from a thread: {err}");
                    std::process::exit(OTHER);
                })
                .join()
                .ok();
                OTHER
            }
            "leader-exit" => {
                let rest = rest.to_vec();
                std::thread::spawn(move || {
                    // Wait until the main thread is gone, then act.
                    std::thread::sleep(Duration::from_millis(300));
                    let code = run_cmd(&rest);
                    let _ = io::stdout().flush();
                    std::process::exit(code);
                });
                // SAFETY: SYS_exit ends only the calling (main) thread, with
                // no unwinding; the other thread exits the process.
                unsafe { libc::syscall(libc::SYS_exit, 0) };
                OTHER
            }
            _ => return None,
        })
    }

    /// Submits one request and waits for its result.
    ///
    /// # Safety
    /// Whatever `sqe` points at must outlive the call.
    unsafe fn submit_and_wait(
        ring: &mut io_uring::IoUring,
        sqe: &io_uring::squeue::Entry,
    ) -> io::Result<()> {
        // SAFETY: the caller keeps the request's memory alive; we wait.
        unsafe { ring.submission().push(sqe) }
            .map_err(|_| io::Error::other("submission queue full"))?;
        ring.submit_and_wait(1)?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("no completion"))?;
        if cqe.result() < 0 {
            Err(io::Error::from_raw_os_error(-cqe.result()))
        } else {
            Ok(())
        }
    }

    fn uring_connect(a: SocketAddr, mode: &str) -> io::Result<()> {
        use io_uring::{IoUring, opcode, squeue, types};
        let mut builder = IoUring::builder();
        if mode == "sqpoll" {
            builder.setup_sqpoll(1000);
        }
        let mut ring: IoUring = builder.build(8)?;
        let fd = socket(family(&a), libc::SOCK_STREAM, 0)?;
        let sa = socket2_free::encode(&a);
        let mut sqe = opcode::Connect::new(types::Fd(fd.0), sa.ptr(), sa.len())
            .build()
            .user_data(7);
        if mode == "async" {
            // Forces the connect onto an io-wq worker thread.
            sqe = sqe.flags(squeue::Flags::ASYNC);
        }
        // SAFETY: sa and fd outlive the request (we wait for completion).
        unsafe { submit_and_wait(&mut ring, &sqe) }
    }

    /// A `sockaddr_un` for `path`, then a NUL and `suffix` inside
    /// `sun_path`, with the length covering all of it.
    fn sockaddr_un(path: &[u8], suffix: &[u8]) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
        // SAFETY: plain data.
        let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let mut bytes = path.to_vec();
        if !suffix.is_empty() {
            bytes.push(0);
            bytes.extend_from_slice(suffix);
        }
        if bytes.len() > sa.sun_path.len() {
            return Err(io::Error::other("path too long"));
        }
        for (d, b) in sa.sun_path.iter_mut().zip(&bytes) {
            *d = *b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len();
        Ok((sa, len as libc::socklen_t))
    }

    fn unix_connect_raw(path: &[u8], suffix: &[u8]) -> io::Result<()> {
        let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)?;
        let (sa, len) = sockaddr_un(path, suffix)?;
        // SAFETY: a valid sockaddr_un of `len` bytes.
        cvt(unsafe { libc::connect(fd.0, (&raw const sa).cast(), len) } as libc::c_long).map(drop)
    }

    fn uring_connect_unix(path: &str) -> io::Result<()> {
        use io_uring::{IoUring, opcode, types};
        let mut ring: IoUring = IoUring::builder().build(8)?;
        let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)?;
        let (sa, len) = sockaddr_un(path.as_bytes(), b"")?;
        let sqe = opcode::Connect::new(types::Fd(fd.0), (&raw const sa).cast(), len)
            .build()
            .user_data(7);
        // SAFETY: sa and fd outlive the request (we wait for completion).
        unsafe { submit_and_wait(&mut ring, &sqe) }
    }

    fn tfo(a: SocketAddr) -> io::Result<()> {
        let fd = socket(family(&a), libc::SOCK_STREAM, 0)?;
        let sa = socket2_free::encode(&a);
        let msg = b"probe";
        // SAFETY: valid buffer and sockaddr.
        cvt(unsafe {
            libc::sendto(
                fd.0,
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_FASTOPEN,
                sa.ptr(),
                sa.len(),
            )
        } as libc::c_long)
        .map(drop)
    }

    fn sendmmsg(a: SocketAddr, ports: &[u16]) -> io::Result<()> {
        let s = std::net::UdpSocket::bind(if a.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        })?;
        use std::os::fd::AsRawFd;
        let addrs: Vec<_> = ports
            .iter()
            .map(|&p| socket2_free::encode(&SocketAddr::new(a.ip(), p)))
            .collect();
        let mut payload = *b"probe";
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: zeroed mmsghdr is valid; pointers below outlive the call.
        let mut msgs: Vec<libc::mmsghdr> = addrs
            .iter()
            .map(|sa| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = sa.ptr() as *mut libc::c_void;
                m.msg_hdr.msg_namelen = sa.len();
                m.msg_hdr.msg_iov = &mut iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut done = 0;
        while done < msgs.len() {
            let left = &mut msgs[done..];
            // SAFETY: left is a valid array of left.len() headers. A batch
            // stops at the first failing message; sending the rest again
            // reports that message's error.
            let rc =
                unsafe { libc::sendmmsg(s.as_raw_fd(), left.as_mut_ptr(), left.len() as u32, 0) };
            let sent = cvt(rc.into())?;
            println!("probe: sendmmsg sent {sent} of {}", left.len());
            done += sent as usize;
        }
        Ok(())
    }

    fn pktinfo(a: SocketAddr) -> io::Result<()> {
        let SocketAddr::V4(v4) = a else {
            return Err(io::Error::other("IP_PKTINFO test is IPv4 only"));
        };
        let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
        let sa = socket2_free::encode(&a);
        let mut payload = *b"probe";
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        // u64 array: aligned buffer for the control message.
        let mut cbuf = [0u64; 8];
        // SAFETY: zeroed msghdr is valid; the cmsg fits in cbuf.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = sa.ptr() as *mut libc::c_void;
            msg.msg_namelen = sa.len();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            let space = libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32);
            msg.msg_controllen = space as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::IPPROTO_IP;
            (*cmsg).cmsg_type = libc::IP_PKTINFO;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
            cvt(libc::sendmsg(fd.0, &msg, 0) as libc::c_long).map(drop)
        }
    }

    fn reconnect(a: SocketAddr, dport: u16) -> io::Result<()> {
        let fd = socket(family(&a), libc::SOCK_STREAM, 0)?;
        if let Err(e) = connect(&fd, &a) {
            println!("probe: connecting to the allowed endpoint failed: {e}");
            return Err(io::Error::other("allowed connect failed"));
        }
        // SAFETY: zeroed sockaddr with family AF_UNSPEC disconnects.
        let mut unspec: libc::sockaddr = unsafe { std::mem::zeroed() };
        unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        let rc = unsafe {
            libc::connect(
                fd.0,
                &unspec,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            )
        };
        println!(
            "probe: connect(AF_UNSPEC): {}",
            if rc == 0 {
                "ok".to_string()
            } else {
                io::Error::last_os_error().to_string()
            }
        );
        connect(&fd, &SocketAddr::new(a.ip(), dport))
    }

    fn ping(ip: std::net::IpAddr) -> io::Result<()> {
        let (fam, proto, ty) = if ip.is_ipv4() {
            (libc::AF_INET, libc::IPPROTO_ICMP, 8u8)
        } else {
            (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8)
        };
        let fd = socket(fam, libc::SOCK_DGRAM, proto)?;
        let sa = socket2_free::encode(&SocketAddr::new(ip, 0));
        // type, code, checksum (kernel fills it), id, seq, payload.
        let pkt = [ty, 0, 0, 0, 0, 0, 0, 1, b'e', b'x', b'f', b'i', b'l'];
        // SAFETY: valid buffer and sockaddr.
        cvt(
            unsafe { libc::sendto(fd.0, pkt.as_ptr().cast(), pkt.len(), 0, sa.ptr(), sa.len()) }
                as libc::c_long,
        )
        .map(drop)
    }

    fn vsock_connect(cid: u32, port: u32) -> io::Result<()> {
        let fd = socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0)?;
        // SAFETY: zeroed sockaddr_vm is valid.
        let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        sa.svm_cid = cid;
        sa.svm_port = port;
        // SAFETY: valid sockaddr_vm.
        cvt(unsafe {
            libc::connect(
                fd.0,
                (&sa as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        }
        .into())
        .map(drop)
    }

    fn ptrace_attach(pid: libc::pid_t) -> io::Result<()> {
        // SAFETY: plain syscalls; on success we detach again at once.
        unsafe {
            cvt(libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0))?;
            let mut status = 0;
            libc::waitpid(pid, &mut status, libc::__WALL);
            libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0);
        }
        Ok(())
    }

    fn process_vm_read(pid: libc::pid_t) -> io::Result<()> {
        // Any mapped address of the target will do.
        // Any mapped address of the target will do; reading its maps needs
        // the same permission, so fall back to a guess (the permission
        // check comes before the address is used).
        let start = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .ok()
            .and_then(|maps| {
                let first = maps.lines().next()?.split('-').next()?.to_string();
                usize::from_str_radix(&first, 16).ok()
            })
            .unwrap_or(0x10000);
        let mut buf = [0u8; 8];
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: start as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: local iovec points at our buffer.
        cvt(unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) } as libc::c_long)
            .map(drop)
    }

    fn pidfd_getfd(pid: libc::pid_t, target_fd: libc::c_int) -> io::Result<()> {
        // SAFETY: plain syscalls.
        let pidfd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
        let pidfd = Fd(pidfd as libc::c_int);
        let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.0, target_fd, 0) })?;
        drop(Fd(fd as libc::c_int));
        Ok(())
    }

    /// Replaces the daemon's control socket with one that "registers" every
    /// launcher without tagging it, and serves until killed.
    fn fake_daemon(path: &str) -> i32 {
        let _ = std::fs::remove_file(path);
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) => {
                println!("probe: bind {path}: {e}");
                return if e.raw_os_error() == Some(libc::EPERM) {
                    super::EPERM
                } else {
                    OTHER
                };
            }
        };
        println!("probe: fake daemon listening on {path}");
        let _ = io::stdout().flush();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            let _ = conn.write_all(
                br#"{"ok":true,"data":{"subject":"acme/researcher","subject_id":1,"hardening":"off","mode":"enforce","cgroup":"/"}}
"#,
            );
        }
        OK
    }

    /// Double fork: the grandchild is reparented (the middle process
    /// exits), then runs CMD and reports its status through a pipe.
    fn orphan(rest: &[String]) -> i32 {
        let mut fds = [0; 2];
        // SAFETY: plain syscalls; children only run our own code and exit.
        unsafe {
            if libc::pipe(fds.as_mut_ptr()) != 0 {
                return OTHER;
            }
            let _ = io::stdout().flush();
            match libc::fork() {
                -1 => OTHER,
                0 => {
                    let middle = libc::getpid();
                    match libc::fork() {
                        -1 => libc::_exit(OTHER),
                        0 => {
                            libc::close(fds[0]);
                            while libc::getppid() == middle {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            println!("probe: orphan reparented to {}", libc::getppid());
                            let code = run_cmd(rest) as u8;
                            let _ = io::stdout().flush();
                            libc::write(fds[1], (&code as *const u8).cast(), 1);
                            libc::_exit(0);
                        }
                        _ => libc::_exit(0),
                    }
                }
                middle => {
                    libc::close(fds[1]);
                    let mut status = 0;
                    libc::waitpid(middle, &mut status, 0);
                    let mut code = OTHER as u8;
                    if libc::read(fds[0], (&mut code as *mut u8).cast(), 1) != 1 {
                        return OTHER;
                    }
                    i32::from(code)
                }
            }
        }
    }

    /// posix_spawn (CLONE_VM | CLONE_VFORK in glibc) of this binary.
    fn spawn(rest: &[String]) -> i32 {
        use std::ffi::CString;
        let exe = CString::new("/proc/self/exe").expect("cstring");
        let args: Vec<CString> = std::iter::once("agent-guard-probe".to_string())
            .chain(rest.iter().cloned())
            .map(|a| CString::new(a).expect("cstring"))
            .collect();
        let mut argv: Vec<*mut libc::c_char> = args.iter().map(|a| a.as_ptr() as _).collect();
        argv.push(std::ptr::null_mut());
        let envp: [*mut libc::c_char; 1] = [std::ptr::null_mut()];
        let mut pid = 0;
        let _ = io::stdout().flush();
        // SAFETY: argv/envp are NULL-terminated arrays of C strings.
        let rc = unsafe {
            libc::posix_spawn(
                &mut pid,
                exe.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                argv.as_ptr(),
                envp.as_ptr(),
            )
        };
        if rc != 0 {
            println!("probe: posix_spawn: {}", io::Error::from_raw_os_error(rc));
            return OTHER;
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            OTHER
        }
    }
}
