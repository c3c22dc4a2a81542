//! Per-subject DNS proxy: every fenced subject gets its own resolver
//! address, so a name an agent resolves can become a capability of that
//! agent only, and a name it may not resolve is refused before it leaves
//! the node.
//!
//! # Design
//!
//! The kernel side redirects a tagged process's DNS traffic (UDP and TCP
//! to port 53) to `subject_addr(S):port`, an address in `127.64.0.0/10`
//! that carries the subject id `S` in its low 22 bits. The proxy binds one
//! UDP socket and one TCP listener per subject on that address (every
//! `127.x.y.z` is local on Linux, no setup needed). The socket a query
//! arrives on says whose query it is: there is no guessing by source port
//! and no table of in-flight sockets to race with.
//!
//! For each query the proxy:
//!
//! 1. parses it; unparsable → FORMERR if an id can be read, else dropped;
//!    no question, or more than one → FORMERR; an opcode other than QUERY
//!    → NOTIMP;
//! 2. asks [`DnsGate::may_resolve`] with the question's name (lowercased,
//!    no trailing dot, non-ASCII bytes escaped the way zone files do);
//!    `false` → REFUSED and [`DnsGate::refused`], nothing goes upstream;
//! 3. looks the question up in the answer cache ([`super::cache`], shared
//!    by all subjects: only the answer's content is cached, never a
//!    decision); a live entry stands in for step 4's upstream answer, with
//!    its TTLs lowered by its age;
//! 4. otherwise forwards the client's bytes, with a fresh random id, to the
//!    upstream servers in order, over UDP and then over TCP when the UDP
//!    answer is truncated. An upstream answer counts only if its id and
//!    question match; only NOERROR and NXDOMAIN are relayed, anything else
//!    tries the next server, and no usable answer → SERVFAIL. A usable
//!    answer is cached if it may be (TTL, RFC 2308, size: see the cache);
//! 5. hands the answer's A/AAAA records (address, TTL) to
//!    [`DnsGate::learned`] *before* replying, so the kernel entries exist by
//!    the time the agent connects; cached or not, this subject's entries
//!    are written for this subject's query. `learned` failing → SERVFAIL
//!    (fail closed). The answer's bytes are then relayed with the client's
//!    id; over UDP an answer larger than 512 bytes (or the client's EDNS
//!    size) is cut to header + question with TC set, so the client retries
//!    over TCP.
//!
//! # Limits
//!
//! - **Shared addresses.** A learned address is reachable for everything
//!   it serves: CDNs and shared load balancers host many names on one
//!   address, and learning one of them opens all of them (to that subject).
//! - **One question.** Only single-question queries are served (RFC 9619);
//!   a second question would be resolved without being judged, so such
//!   queries get FORMERR instead.
//! - **What is learned.** Only A/AAAA records reached from the question
//!   name through the answer's CNAME chain count; unrelated records an
//!   upstream adds are relayed but not learned. Addresses in other record
//!   types (SVCB/HTTPS hints, SRV/MX additionals) are never learned: the
//!   agent has to resolve those names itself, and is judged for them.
//! - **Tunnels.** A name the gate allows carries whatever its labels say:
//!   if the gate allows a whole zone, the zone's authoritative servers can
//!   receive data through the query names. Keep allowed names narrow.
//! - **Who asks.** The proxy trusts the kernel for identity. Any local
//!   process that can reach another subject's address speaks as that
//!   subject, so the kernel side must stop tagged processes from reaching
//!   `127.64.0.0/10` other than through the redirect to their own address.
//!   Unconnected UDP clients also need the reply's source rewritten back to
//!   the server they asked (cgroup `recvmsg4`), or they drop the answer.
//! - **IPv4 only.** Subject addresses are IPv4 loopback addresses; DNS
//!   sent to an IPv6 server has to be redirected (or refused) by the kernel
//!   side. AAAA answers are learned like A answers.
//! - **No validation.** DNSSEC is passed through, not validated. Upstream
//!   answers are trusted once id, source and question match, and a cached
//!   one for as long as its TTL says. Concurrent misses for one question
//!   each go upstream (no coalescing).
//! - **Gate calls run on the runtime.** [`DnsGate`] methods are plain
//!   functions called from tokio tasks; they must not block for long. Over
//!   UDP, what needs no upstream (refusals, malformed queries, cache hits)
//!   is answered in the subject's receive loop itself, one query after the
//!   other, without a task or channel hop; only misses get a task each.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hickory_resolver::proto::{
    op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData},
};

use super::cache::{self, AnswerCache};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
    sync::{Semaphore, mpsc},
    task::{JoinHandle, JoinSet},
};

/// Network of the subject addresses: `127.64.0.0/10`.
pub const SUBJECT_NET: Ipv4Addr = Ipv4Addr::new(127, 64, 0, 0);
/// Prefix length of [`SUBJECT_NET`].
pub const SUBJECT_PREFIX_LEN: u8 = 10;
/// Largest subject id that has an address (22 bits).
pub const MAX_SUBJECT: u32 = (1 << 22) - 1;
/// Per-try upstream timeout when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Answers cached when not configured (`--dns-cache-entries`).
pub const DEFAULT_CACHE_ENTRIES: u64 = 10_000;

/// DNS over UDP without EDNS (RFC 1035 §4.2.1).
const UDP_PLAIN_MAX: usize = 512;
/// EDNS payload size we advertise in answers we make ourselves
/// (the DNS flag day 2020 value, avoids IP fragmentation).
const EDNS_PAYLOAD: u16 = 1232;
/// Largest DNS message: TCP framing has a 16-bit length.
const MAX_MESSAGE: usize = 65535;

/// Resource bounds of one subject's server.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// A TCP connection with no complete query for this long is closed.
    tcp_idle: Duration,
    /// Concurrent TCP connections per subject; more are closed at once.
    tcp_connections: usize,
    /// UDP queries being answered at once per subject; more are dropped.
    udp_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tcp_idle: Duration::from_secs(10),
            tcp_connections: 64,
            udp_in_flight: 256,
        }
    }
}

/// The subject's resolver address: `127.64.0.0 | subject`.
///
/// `subject` must be at most [`MAX_SUBJECT`]; higher bits are ignored
/// ([`DnsProxy::add_subject`] refuses such ids).
pub fn subject_addr(subject: u32) -> Ipv4Addr {
    debug_assert!(
        subject <= MAX_SUBJECT,
        "subject id {subject} has no address"
    );
    Ipv4Addr::from(u32::from(SUBJECT_NET) | (subject & MAX_SUBJECT))
}

/// The subject whose resolver address `addr` is, if it is one.
pub fn subject_of(addr: Ipv4Addr) -> Option<u32> {
    let bits = u32::from(addr);
    (bits & !MAX_SUBJECT == u32::from(SUBJECT_NET)).then_some(bits & MAX_SUBJECT)
}

/// What the daemon decides and records about a subject's DNS.
pub trait DnsGate: Send + Sync + 'static {
    /// Whether `subject` may resolve `name` (lowercase, no trailing dot).
    fn may_resolve(&self, subject: u32, name: &str) -> bool;
    /// `name` resolved to these (address, TTL seconds) for `subject`;
    /// called before the answer is relayed, only when it has addresses.
    /// An error makes the client get SERVFAIL instead of the answer.
    fn learned(&self, subject: u32, name: &str, answers: &[(IpAddr, u32)]) -> Result<(), String>;
    /// A query for `name` of type `qtype` ("A", "AAAA", "TXT", ...) was
    /// refused.
    fn refused(&self, subject: u32, name: &str, qtype: &str);
    /// An allowed query was looked up in the answer cache: `hit` if it was
    /// answered from there (the gate and `learned` ran all the same).
    fn cache_lookup(&self, _subject: u32, _hit: bool) {}
}

/// How the proxy listens and where it forwards.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Port bound on every subject address (53 in production).
    pub port: u16,
    /// Upstream servers, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Time allowed for one exchange with one upstream.
    pub timeout: Duration,
    /// Answers kept in the cache at most; 0: no cache.
    pub cache_entries: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            port: 53,
            upstreams: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            cache_entries: DEFAULT_CACHE_ENTRIES,
        }
    }
}

/// Counters since the proxy was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProxyStats {
    /// Messages received (UDP datagrams and TCP messages).
    pub queries: u64,
    /// Queries the gate refused.
    pub refused: u64,
    /// Queries the gate allowed and that were sent upstream.
    pub forwarded: u64,
    /// Allowed queries answered from the cache (not sent upstream).
    pub cache_hits: u64,
    /// Allowed queries looked up in the cache and not found there.
    pub cache_misses: u64,
    /// Answers in the cache now (approximate).
    pub cached: u64,
    /// Allowed queries answered with SERVFAIL: no usable upstream answer,
    /// or `learned` failed.
    pub failed: u64,
    /// Queries answered FORMERR/NOTIMP or dropped as unreadable.
    pub malformed: u64,
    /// UDP answers cut to header + question (TC set).
    pub truncated: u64,
    /// Queries and TCP connections dropped because a per-subject bound
    /// was reached.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    queries: AtomicU64,
    refused: AtomicU64,
    forwarded: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    failed: AtomicU64,
    malformed: AtomicU64,
    truncated: AtomicU64,
    dropped: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Why no upstream answer could be used (logged at debug level; the
/// client sees SERVFAIL).
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("no upstream DNS server configured")]
    NoUpstreams,
    #[error("upstream {server}: no answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("upstream {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream {server}: {why}")]
    Unusable {
        server: SocketAddr,
        why: &'static str,
    },
}

/// What every server task of the proxy shares.
struct Shared {
    config: ProxyConfig,
    gate: Arc<dyn DnsGate>,
    /// `None` when `cache_entries` is 0.
    cache: Option<AnswerCache>,
    counters: Counters,
    limits: Limits,
}

/// The running servers. Dropping the last [`DnsProxy`] clone stops them.
#[derive(Default)]
struct Registry {
    servers: Mutex<HashMap<u32, Server>>,
    /// Tasks of removed subjects, until they have let go of their sockets.
    stopping: Mutex<HashMap<u32, Vec<JoinHandle<()>>>>,
}

/// One subject's UDP and TCP server tasks. Each task alone owns its
/// socket (child tasks get none), so aborting it closes the socket.
struct Server {
    udp: JoinHandle<()>,
    tcp: JoinHandle<()>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        for server in lock(&self.servers).values() {
            server.udp.abort();
            server.tcp.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The per-subject DNS proxy. Cheap to clone; clones share the servers.
#[derive(Clone)]
pub struct DnsProxy {
    shared: Arc<Shared>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for DnsProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsProxy")
            .field("config", &self.shared.config)
            .field("subjects", &self.subjects())
            .finish_non_exhaustive()
    }
}

impl DnsProxy {
    pub fn new(config: ProxyConfig, gate: Arc<dyn DnsGate>) -> Self {
        Self::with_limits(config, gate, Limits::default())
    }

    fn with_limits(config: ProxyConfig, gate: Arc<dyn DnsGate>, limits: Limits) -> Self {
        Self {
            shared: Arc::new(Shared {
                cache: (config.cache_entries > 0).then(|| AnswerCache::new(config.cache_entries)),
                config,
                gate,
                counters: Counters::default(),
                limits,
            }),
            registry: Arc::new(Registry::default()),
        }
    }

    /// Binds UDP and TCP on `subject_addr(subject):port` and starts serving
    /// (tokio tasks). Idempotent: a subject already served is left as is.
    pub async fn add_subject(&self, subject: u32) -> io::Result<()> {
        if subject > MAX_SUBJECT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("subject id {subject} is above {MAX_SUBJECT}, it has no DNS proxy address"),
            ));
        }
        // A server removed just before still holds the address until its
        // tasks are dropped; wait for that so the bind below succeeds.
        let previous = lock(&self.registry.stopping)
            .remove(&subject)
            .unwrap_or_default();
        for task in previous {
            let _ = task.await;
        }
        self.start_serving(subject)
    }

    /// [`DnsProxy::add_subject`] from synchronous code inside the runtime
    /// (the daemon's registry paths). Subject ids are never reused, so
    /// there is no earlier server of the same id to wait for; if one is
    /// still closing, this fails instead of waiting.
    pub fn add_subject_now(&self, subject: u32) -> io::Result<()> {
        if subject > MAX_SUBJECT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("subject id {subject} is above {MAX_SUBJECT}, it has no DNS proxy address"),
            ));
        }
        {
            let mut stopping = lock(&self.registry.stopping);
            if let Some(tasks) = stopping.get_mut(&subject) {
                tasks.retain(|t| !t.is_finished());
                if !tasks.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("subject {subject}'s previous DNS proxy is still closing"),
                    ));
                }
                stopping.remove(&subject);
            }
        }
        self.start_serving(subject)
    }

    fn start_serving(&self, subject: u32) -> io::Result<()> {
        let mut servers = lock(&self.registry.servers);
        if servers.contains_key(&subject) {
            return Ok(());
        }
        let addr = SocketAddr::from((subject_addr(subject), self.shared.config.port));
        let udp = bind_udp(addr)?;
        let tcp = bind_tcp(addr)?;
        let server = Server {
            udp: tokio::spawn(serve_udp(self.shared.clone(), subject, udp)),
            tcp: tokio::spawn(serve_tcp(self.shared.clone(), subject, tcp)),
        };
        servers.insert(subject, server);
        tracing::debug!(subject, %addr, "DNS proxy serving subject");
        Ok(())
    }

    /// Stops serving `subject` and closes its sockets (as soon as the
    /// runtime drops its tasks, which [`DnsProxy::add_subject`] waits
    /// for). Idempotent.
    pub fn remove_subject(&self, subject: u32) {
        let Some(server) = lock(&self.registry.servers).remove(&subject) else {
            return;
        };
        server.udp.abort();
        server.tcp.abort();
        let mut stopping = lock(&self.registry.stopping);
        stopping.retain(|_, tasks| {
            tasks.retain(|t| !t.is_finished());
            !tasks.is_empty()
        });
        stopping
            .entry(subject)
            .or_default()
            .extend([server.udp, server.tcp]);
        tracing::debug!(subject, "DNS proxy stopped serving subject");
    }

    /// Subjects being served, in ascending order.
    pub fn subjects(&self) -> Vec<u32> {
        let mut subjects: Vec<u32> = lock(&self.registry.servers).keys().copied().collect();
        subjects.sort_unstable();
        subjects
    }

    /// Counters for status and metrics.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            queries: get(&c.queries),
            refused: get(&c.refused),
            forwarded: get(&c.forwarded),
            cache_hits: get(&c.cache_hits),
            cache_misses: get(&c.cache_misses),
            cached: self.shared.cache.as_ref().map_or(0, AnswerCache::entries),
            failed: get(&c.failed),
            malformed: get(&c.malformed),
            truncated: get(&c.truncated),
            dropped: get(&c.dropped),
        }
    }

    /// Answers in the cache once its pending evictions ran (tests).
    #[cfg(test)]
    fn cache_len(&self) -> u64 {
        self.shared
            .cache
            .as_ref()
            .map_or(0, AnswerCache::settled_len)
    }
}

/// The `nameserver` addresses of a resolv.conf text, port 53, in order,
/// without duplicates and without our own subject addresses (a resolv.conf
/// that points at the proxy must not make it forward to itself).
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next().and_then(nameserver_addr) else {
            continue;
        };
        let own = match addr.ip() {
            IpAddr::V4(v4) => subject_of(v4).is_some(),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().and_then(subject_of).is_some(),
        };
        if !own && !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// `1.2.3.4`, `2001:db8::1` or `fe80::1%eth0` (zone by name or index).
fn nameserver_addr(word: &str) -> Option<SocketAddr> {
    if let Ok(ip) = word.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    let (ip, zone) = word.split_once('%')?;
    let ip: Ipv6Addr = ip.parse().ok()?;
    let scope = match zone.parse::<u32>() {
        Ok(index) => index,
        Err(_) => nix::net::if_::if_nametoindex(zone).ok()?,
    };
    Some(SocketAddr::V6(SocketAddrV6::new(ip, 53, 0, scope)))
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let bound = std::net::UdpSocket::bind(addr)
        .and_then(|s| {
            s.set_nonblocking(true)?;
            UdpSocket::from_std(s)
        })
        .map_err(|e| io::Error::new(e.kind(), format!("DNS proxy: binding udp {addr}: {e}")))?;
    Ok(bound)
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let listen = || {
        let socket = TcpSocket::new_v4()?;
        // Rebinding right after a removal must not wait for TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(128)
    };
    listen().map_err(|e| io::Error::new(e.kind(), format!("DNS proxy: binding tcp {addr}: {e}")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// Serves one subject's UDP socket. What needs no upstream (refusals,
/// malformed queries, cache hits) is answered right here, without a task
/// or a channel in between; queries that go upstream are answered by
/// children, which hand the reply back through a channel, so only this
/// task holds the socket.
async fn serve_udp(shared: Arc<Shared>, subject: u32, socket: UdpSocket) {
    let limit = shared.limits.udp_in_flight.max(1);
    let (reply_tx, mut reply_rx) = mpsc::channel::<(Vec<u8>, SocketAddr)>(limit);
    let mut in_flight = JoinSet::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (len, peer) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(subject, "DNS proxy udp receive: {e}");
                        continue;
                    }
                };
                bump(&shared.counters.queries);
                let query = &buf[..len];
                let pending = match shared.answer_now(subject, query, Transport::Udp) {
                    Step::Done(reply) => {
                        if let Some(reply) = reply
                            && let Err(e) = socket.send_to(&reply, peer).await
                        {
                            tracing::debug!(subject, %peer, "DNS proxy udp send: {e}");
                        }
                        continue;
                    }
                    Step::Upstream(pending) => pending,
                };
                if in_flight.len() >= limit {
                    bump(&shared.counters.dropped);
                    tracing::debug!(subject, %peer, "DNS proxy: too many udp queries in flight, dropped");
                    continue;
                }
                let query = query.to_vec();
                let (shared, reply_tx) = (shared.clone(), reply_tx.clone());
                in_flight.spawn(async move {
                    let answer =
                        shared.answer_from_upstream(subject, &query, pending, Transport::Udp);
                    if let Some(reply) = answer.await {
                        let _ = reply_tx.send((reply, peer)).await;
                    }
                });
            }
            Some((reply, peer)) = reply_rx.recv() => {
                if let Err(e) = socket.send_to(&reply, peer).await {
                    tracing::debug!(subject, %peer, "DNS proxy udp send: {e}");
                }
            }
            Some(_) = in_flight.join_next() => {}
        }
    }
}

/// Serves one subject's TCP listener. Connection tasks live in a
/// `JoinSet` owned here, so aborting this task ends them too.
async fn serve_tcp(shared: Arc<Shared>, subject: u32, listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(shared.limits.tcp_connections));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let shared = shared.clone();
                        connections.spawn(async move {
                            serve_tcp_connection(&shared, subject, stream).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        bump(&shared.counters.dropped);
                        tracing::debug!(subject, %peer, "DNS proxy: too many tcp connections, closed");
                    }
                },
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::debug!(subject, "DNS proxy tcp accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Length-framed queries (RFC 1035 §4.2.2), answered one after the other,
/// until the client closes, stays idle too long or sends a broken message.
async fn serve_tcp_connection(shared: &Shared, subject: u32, mut stream: TcpStream) {
    let idle = shared.limits.tcp_idle;
    loop {
        let mut len = [0u8; 2];
        if !matches!(
            tokio::time::timeout(idle, stream.read_exact(&mut len)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len == 0 {
            return;
        }
        let mut query = vec![0u8; len];
        if !matches!(
            tokio::time::timeout(idle, stream.read_exact(&mut query)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        bump(&shared.counters.queries);
        let Some(reply) = shared.answer(subject, &query, Transport::Tcp).await else {
            return;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if !matches!(
            tokio::time::timeout(idle, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// An upstream answer that matched our request.
struct UpstreamAnswer {
    bytes: Vec<u8>,
    message: Message,
}

impl UpstreamAnswer {
    /// The answer re-encoded from its parse, never the upstream's own
    /// bytes. Replies (and cache hits) patch the id, flags and TTLs in
    /// place; an upstream's compression pointer may point into those
    /// fields (any earlier offset is legal), and the client would then read
    /// other names than the ones judged and learned here, or bytes that no
    /// longer parse (found by fuzzing). Our encoder points only at names it
    /// wrote, so patching those fields never changes a name.
    fn new(server: SocketAddr, message: Message) -> Result<Self, ForwardError> {
        let bytes = message.to_vec().map_err(|_| ForwardError::Unusable {
            server,
            why: "answer does not encode again",
        })?;
        Ok(Self { bytes, message })
    }
}

/// What a query is answered with, from upstream or from the cache.
struct Answer {
    /// The reply, id not yet the client's.
    bytes: Vec<u8>,
    /// What to open for the subject before replying.
    learned: Vec<(IpAddr, u32)>,
    cached: bool,
}

/// How far [`Shared::answer_now`] got with a query.
enum Step {
    /// The reply (`None`: send nothing).
    Done(Option<Vec<u8>>),
    /// Allowed and not in the cache: ask the upstreams.
    Upstream(Pending),
}

/// An allowed query on its way upstream.
struct Pending {
    request: Message,
    /// The name the gate judged.
    name: String,
    /// Where to cache the answer, if it may be cached.
    key: Option<cache::Key>,
}

impl Shared {
    /// The reply to one query, `None` to send nothing.
    async fn answer(&self, subject: u32, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match self.answer_now(subject, query, transport) {
            Step::Done(reply) => reply,
            Step::Upstream(pending) => {
                self.answer_from_upstream(subject, query, pending, transport)
                    .await
            }
        }
    }

    /// Everything that needs no upstream: parsing, the gate, the cache.
    fn answer_now(&self, subject: u32, query: &[u8], transport: Transport) -> Step {
        let request = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                bump(&self.counters.malformed);
                tracing::debug!(subject, "DNS proxy: unreadable query: {e}");
                return Step::Done(format_error_for(query));
            }
        };
        if request.message_type() != MessageType::Query {
            // A response sent to us: answering could start a loop.
            bump(&self.counters.malformed);
            return Step::Done(None);
        }
        if request.op_code() != OpCode::Query {
            bump(&self.counters.malformed);
            return Step::Done(encode(&reply_to(&request, ResponseCode::NotImp)));
        }
        let [question] = request.queries() else {
            bump(&self.counters.malformed);
            tracing::debug!(
                subject,
                questions = request.queries().len(),
                "DNS proxy: not one question"
            );
            return Step::Done(encode(&reply_to(&request, ResponseCode::FormErr)));
        };
        // The question name must be plain labels. The upstream is sent the
        // client's own bytes under a new id; a compression pointer into the
        // header (the id) would make it read another name than the one
        // judged here (found by fuzzing: a way past the gate).
        if cache::question_name_end(query).is_none() {
            bump(&self.counters.malformed);
            tracing::debug!(subject, "DNS proxy: compressed question name");
            return Step::Done(encode(&reply_to(&request, ResponseCode::FormErr)));
        }
        let name = judged_name(question.name());
        let qtype = question.query_type();
        if !self.gate.may_resolve(subject, &name) {
            bump(&self.counters.refused);
            tracing::debug!(subject, name, %qtype, "DNS proxy: refused");
            self.gate.refused(subject, &name, &qtype.to_string());
            return Step::Done(encode(&reply_to(&request, ResponseCode::Refused)));
        }
        // Past the gate, and only past it: a cached answer is content,
        // never a decision, and `learned` runs for it all the same.
        let Some((cache, key)) = self
            .cache
            .as_ref()
            .and_then(|c| Some((c, cache::key(query, &request)?)))
        else {
            return Step::Upstream(Pending {
                request,
                name,
                key: None,
            });
        };
        let hit = cache.get(&key, query);
        let counter = match hit {
            Some(_) => &self.counters.cache_hits,
            None => &self.counters.cache_misses,
        };
        bump(counter);
        self.gate.cache_lookup(subject, hit.is_some());
        match hit {
            Some(hit) => {
                let answer = Answer {
                    bytes: hit.bytes,
                    learned: hit.learned,
                    cached: true,
                };
                Step::Done(self.reply(subject, &request, &name, answer, transport))
            }
            None => Step::Upstream(Pending {
                request,
                name,
                key: Some(key),
            }),
        }
    }

    /// Answers an allowed query from the upstreams (and caches the answer
    /// if it may be cached).
    async fn answer_from_upstream(
        &self,
        subject: u32,
        query: &[u8],
        pending: Pending,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let Pending { request, name, key } = pending;
        let question = request.queries().first()?;
        bump(&self.counters.forwarded);
        let upstream = match self.forward(query, question).await {
            Ok(a) => a,
            Err(e) => {
                bump(&self.counters.failed);
                let qtype = question.query_type();
                tracing::debug!(subject, name, %qtype, "DNS proxy: {e}");
                return encode(&reply_to(&request, ResponseCode::ServFail));
            }
        };
        let learned = addresses(&upstream.message, question.name());
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            let qtype = question.query_type();
            cache.insert(key, &upstream.bytes, &upstream.message, qtype, &learned);
        }
        let answer = Answer {
            bytes: upstream.bytes,
            learned,
            cached: false,
        };
        self.reply(subject, &request, &name, answer, transport)
    }

    /// Opens the answer's addresses for `subject`, then the reply: the
    /// answer with the client's id, or cut to fit a UDP client.
    fn reply(
        &self,
        subject: u32,
        request: &Message,
        name: &str,
        answer: Answer,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        if !answer.learned.is_empty()
            && let Err(e) = self.gate.learned(subject, name, &answer.learned)
        {
            bump(&self.counters.failed);
            tracing::debug!(subject, name, "DNS proxy: learning the answer failed: {e}");
            return encode(&reply_to(request, ResponseCode::ServFail));
        }
        tracing::debug!(
            subject,
            name,
            addresses = answer.learned.len(),
            cached = answer.cached,
            "DNS proxy: answered"
        );
        let limit = usize::from(request.max_payload()).max(UDP_PLAIN_MAX);
        if transport == Transport::Udp && answer.bytes.len() > limit {
            bump(&self.counters.truncated);
            let mut cut = match Message::from_vec(&answer.bytes) {
                Ok(m) => m.truncate(),
                Err(_) => reply_to(request, ResponseCode::ServFail),
            };
            cut.set_id(request.id());
            return encode(&cut);
        }
        let mut bytes = answer.bytes;
        bytes[..2].copy_from_slice(&request.id().to_be_bytes());
        Some(bytes)
    }

    /// Asks the upstreams in order; the first usable answer wins.
    async fn forward(
        &self,
        query: &[u8],
        question: &Query,
    ) -> Result<UpstreamAnswer, ForwardError> {
        let mut last = ForwardError::NoUpstreams;
        for &server in &self.config.upstreams {
            let outcome = match self.exchange(server, query, question, Transport::Udp).await {
                Ok(a) if a.message.truncated() => {
                    self.exchange(server, query, question, Transport::Tcp).await
                }
                other => other,
            };
            match outcome {
                Ok(a)
                    if matches!(
                        a.message.response_code(),
                        ResponseCode::NoError | ResponseCode::NXDomain
                    ) =>
                {
                    return Ok(a);
                }
                Ok(_) => {
                    last = ForwardError::Unusable {
                        server,
                        why: "answered with an error code",
                    }
                }
                Err(e) => last = e,
            }
            tracing::debug!("DNS proxy: {last}; trying the next upstream");
        }
        Err(last)
    }

    /// One exchange with one upstream within the per-try timeout, with a
    /// fresh random id.
    async fn exchange(
        &self,
        server: SocketAddr,
        query: &[u8],
        question: &Query,
        transport: Transport,
    ) -> Result<UpstreamAnswer, ForwardError> {
        let id: u16 = rand::random();
        let mut request = query.to_vec();
        request[..2].copy_from_slice(&id.to_be_bytes());
        let timeout = self.config.timeout;
        let exchange = async {
            match transport {
                Transport::Udp => udp_exchange(server, &request, id, question).await,
                Transport::Tcp => tcp_exchange(server, &request, id, question).await,
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ForwardError::Timeout { server, timeout })?
    }
}

/// Over UDP, datagrams that are not the answer (wrong id or question, late
/// answers, spoofing attempts) are skipped; the timeout ends the wait.
async fn udp_exchange(
    server: SocketAddr,
    request: &[u8],
    id: u16,
    question: &Query,
) -> Result<UpstreamAnswer, ForwardError> {
    let io_err = |source| ForwardError::Io { server, source };
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // Connected: the kernel drops datagrams from any other source.
    let socket = UdpSocket::bind(local).await.map_err(io_err)?;
    socket.connect(server).await.map_err(io_err)?;
    socket.send(request).await.map_err(io_err)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let len = socket.recv(&mut buf).await.map_err(io_err)?;
        if let Some(message) = matching_answer(&buf[..len], id, question) {
            return UpstreamAnswer::new(server, message);
        }
    }
}

async fn tcp_exchange(
    server: SocketAddr,
    request: &[u8],
    id: u16,
    question: &Query,
) -> Result<UpstreamAnswer, ForwardError> {
    let io_err = |source| ForwardError::Io { server, source };
    let request_len = u16::try_from(request.len()).map_err(|_| ForwardError::Unusable {
        server,
        why: "query too long for tcp",
    })?;
    let mut stream = TcpStream::connect(server).await.map_err(io_err)?;
    let mut framed = Vec::with_capacity(request.len() + 2);
    framed.extend_from_slice(&request_len.to_be_bytes());
    framed.extend_from_slice(request);
    stream.write_all(&framed).await.map_err(io_err)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io_err)?;
    let mut bytes = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut bytes).await.map_err(io_err)?;
    let message = matching_answer(&bytes, id, question).ok_or(ForwardError::Unusable {
        server,
        why: "tcp answer does not match the query",
    })?;
    UpstreamAnswer::new(server, message)
}

/// The parsed answer if `bytes` answer our request: a response with our
/// id and our question (an error answer may carry no question).
fn matching_answer(bytes: &[u8], id: u16, question: &Query) -> Option<Message> {
    let message = Message::from_vec(bytes).ok()?;
    if message.message_type() != MessageType::Response || message.id() != id {
        return None;
    }
    let same_question = match message.queries() {
        [q] => {
            q.name() == question.name()
                && q.query_type() == question.query_type()
                && q.query_class() == question.query_class()
        }
        [] => message.response_code() != ResponseCode::NoError,
        _ => false,
    };
    same_question.then_some(message)
}

/// A/AAAA records (address, TTL) of the answer section owned by `qname`
/// or by a name its CNAME chain leads to.
fn addresses(answer: &Message, qname: &Name) -> Vec<(IpAddr, u32)> {
    let mut aliases: HashMap<&Name, Vec<&Name>> = HashMap::new();
    for record in answer.answers() {
        if let RData::CNAME(target) = record.data() {
            aliases.entry(record.name()).or_default().push(&target.0);
        }
    }
    let mut chain: HashSet<&Name> = HashSet::from([qname]);
    let mut todo = vec![qname];
    while let Some(name) = todo.pop() {
        for &target in aliases.get(name).into_iter().flatten() {
            if chain.insert(target) {
                todo.push(target);
            }
        }
    }
    answer
        .answers()
        .iter()
        .filter(|r| chain.contains(r.name()))
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl())),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl())),
            _ => None,
        })
        .collect()
}

/// The name the gate judges: ASCII (punycode kept, other bytes escaped as
/// `\ddd`, a dot inside a label as `\.`), lowercase, no trailing dot.
fn judged_name(name: &Name) -> String {
    let mut s = name.to_ascii();
    s.make_ascii_lowercase();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

/// A reply we make ourselves: same id, opcode, RD and CD, question echoed,
/// RA set, an OPT record if the client sent one.
fn reply_to(request: &Message, code: ResponseCode) -> Message {
    let mut header = Header::response_from_request(request.header());
    header.set_recursion_available(true);
    header.set_response_code(code);
    let mut reply = Message::new();
    reply.set_header(header);
    reply.add_queries(request.queries().iter().cloned());
    if request.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        reply.set_edns(edns);
    }
    reply
}

/// FORMERR for a message we could not parse, if it has an id and does not
/// claim to be a response.
fn format_error_for(raw: &[u8]) -> Option<Vec<u8>> {
    let [hi, lo, flags, ..] = *raw else {
        return None;
    };
    if flags & 0x80 != 0 {
        return None;
    }
    let mut reply = Message::error_msg(
        u16::from_be_bytes([hi, lo]),
        OpCode::Query,
        ResponseCode::FormErr,
    );
    reply.set_recursion_available(true);
    encode(&reply)
}

fn encode(message: &Message) -> Option<Vec<u8>> {
    message
        .to_vec()
        .map_err(|e| tracing::debug!("DNS proxy: encoding a reply: {e}"))
        .ok()
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv6Addr,
        sync::atomic::AtomicUsize,
        time::{Duration, Instant},
    };

    use hickory_resolver::proto::rr::{
        Record, RecordType,
        rdata::{AAAA, CNAME},
    };

    use super::*;
    use crate::daemon::dns::test_records::{a, name, query, soa};

    // ----- a fake gate that records what it was asked, in order -----

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        MayResolve(u32, String),
        Learned(u32, String, Vec<(IpAddr, u32)>),
        Refused(u32, String, String),
    }

    #[derive(Default)]
    struct FakeGate {
        /// (subject, name) pairs that may be resolved.
        allowed: Vec<(u32, &'static str)>,
        fail_learning: bool,
        /// `learned` takes this long, to show the reply waits for it.
        learn_delay: Duration,
        calls: Mutex<Vec<Call>>,
        /// When `learned` returned.
        learned_at: Mutex<Option<Instant>>,
        /// Cache lookups reported: (hits, misses); not in `calls`.
        cache_lookups: Mutex<(usize, usize)>,
    }

    impl FakeGate {
        fn allowing(allowed: &[(u32, &'static str)]) -> Arc<Self> {
            Arc::new(Self {
                allowed: allowed.to_vec(),
                ..Self::default()
            })
        }
        /// Allows `allowed`, but `learned` takes 100 ms: a reply that does
        /// not wait for it leaves first.
        fn slow_to_learn(allowed: &[(u32, &'static str)]) -> Arc<Self> {
            Arc::new(Self {
                allowed: allowed.to_vec(),
                learn_delay: Duration::from_millis(100),
                ..Self::default()
            })
        }
        /// Allows `allowed`, but every `learned` fails (a full kernel map).
        fn failing_to_learn(allowed: &[(u32, &'static str)]) -> Arc<Self> {
            Arc::new(Self {
                allowed: allowed.to_vec(),
                fail_learning: true,
                ..Self::default()
            })
        }
        fn calls(&self) -> Vec<Call> {
            lock(&self.calls).clone()
        }
        fn learned(&self) -> Vec<Call> {
            self.calls()
                .into_iter()
                .filter(|c| matches!(c, Call::Learned(..)))
                .collect()
        }
    }

    impl DnsGate for FakeGate {
        fn may_resolve(&self, subject: u32, name: &str) -> bool {
            lock(&self.calls).push(Call::MayResolve(subject, name.to_string()));
            self.allowed.contains(&(subject, name))
        }
        fn learned(
            &self,
            subject: u32,
            name: &str,
            answers: &[(IpAddr, u32)],
        ) -> Result<(), String> {
            std::thread::sleep(self.learn_delay);
            lock(&self.calls).push(Call::Learned(subject, name.to_string(), answers.to_vec()));
            *lock(&self.learned_at) = Some(Instant::now());
            if self.fail_learning {
                Err("kernel map full".to_string())
            } else {
                Ok(())
            }
        }
        fn refused(&self, subject: u32, name: &str, qtype: &str) {
            lock(&self.calls).push(Call::Refused(subject, name.to_string(), qtype.to_string()));
        }
        fn cache_lookup(&self, _subject: u32, hit: bool) {
            let mut counts = lock(&self.cache_lookups);
            if hit {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
        }
    }

    // ----- a fake upstream DNS server (UDP + TCP on one 127.0.0.1 port) -----

    const BIG_RECORDS: usize = 60;

    struct FakeUpstream {
        addr: SocketAddr,
        udp_queries: Arc<AtomicUsize>,
        tcp_queries: Arc<AtomicUsize>,
        tasks: Vec<JoinHandle<()>>,
    }

    impl Drop for FakeUpstream {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    impl FakeUpstream {
        fn received(&self) -> usize {
            self.udp_queries.load(Ordering::SeqCst) + self.tcp_queries.load(Ordering::SeqCst)
        }

        async fn start() -> Self {
            // UDP and TCP must share the port, as a real server's do.
            let (udp, tcp) = loop {
                let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
                let addr = udp.local_addr().expect("udp addr");
                if let Ok(tcp) = TcpListener::bind(addr).await {
                    break (udp, tcp);
                }
            };
            let addr = udp.local_addr().expect("udp addr");
            let udp_queries = Arc::new(AtomicUsize::new(0));
            let tcp_queries = Arc::new(AtomicUsize::new(0));
            let udp_count = udp_queries.clone();
            let udp_task = tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_MESSAGE];
                while let Ok((len, peer)) = udp.recv_from(&mut buf).await {
                    udp_count.fetch_add(1, Ordering::SeqCst);
                    let Ok(query) = Message::from_vec(&buf[..len]) else {
                        continue;
                    };
                    let mut reply = fake_answer(&query);
                    let full = reply.to_vec().expect("encode");
                    let bytes = if full.len() > usize::from(query.max_payload()) {
                        reply = reply.truncate();
                        reply.to_vec().expect("encode")
                    } else {
                        full
                    };
                    let _ = udp.send_to(&bytes, peer).await;
                }
            });
            let tcp_count = tcp_queries.clone();
            let tcp_task = tokio::spawn(async move {
                while let Ok((mut stream, _)) = tcp.accept().await {
                    let count = tcp_count.clone();
                    tokio::spawn(async move {
                        while let Ok(query) = read_framed(&mut stream).await {
                            count.fetch_add(1, Ordering::SeqCst);
                            let Ok(query) = Message::from_vec(&query) else {
                                return;
                            };
                            let reply = fake_answer(&query).to_vec().expect("encode");
                            if write_framed(&mut stream, &reply).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            Self {
                addr,
                udp_queries,
                tcp_queries,
                tasks: vec![udp_task, tcp_task],
            }
        }
    }

    /// The fake zone: a.test (A, AAAA), b.test, alias.test (a CNAME chain
    /// plus an unrelated record), big.test (more than 512 bytes),
    /// short.test (TTL 1 s), gone.test (NXDOMAIN, SOA MINIMUM 1 s),
    /// empty.test (NODATA, SOA TTL 60 s, MINIMUM 30 s), fail.test
    /// (SERVFAIL), and NXDOMAIN without SOA for the rest.
    fn fake_answer(query: &Message) -> Message {
        let mut header = Header::response_from_request(query.header());
        header.set_recursion_available(true);
        let mut reply = Message::new();
        reply.set_header(header);
        reply.add_queries(query.queries().iter().cloned());
        if let Some(edns) = query.extensions() {
            reply.set_edns(edns.clone());
        }
        let Some(q) = query.queries().first() else {
            reply.set_response_code(ResponseCode::FormErr);
            return reply;
        };
        let qname = judged_name(q.name());
        match (qname.as_str(), q.query_type()) {
            ("a.test", RecordType::A) => {
                reply.add_answer(a("a.test.", 300, [192, 0, 2, 1]));
            }
            ("a.test", RecordType::AAAA) => {
                let ip = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
                reply.add_answer(Record::from_rdata(
                    name("a.test."),
                    300,
                    RData::AAAA(AAAA(ip)),
                ));
            }
            ("b.test", RecordType::A) => {
                reply.add_answer(a("b.test.", 30, [192, 0, 2, 2]));
            }
            ("alias.test", RecordType::A) => {
                let cname = |from: &str, to: &str| {
                    Record::from_rdata(name(from), 100, RData::CNAME(CNAME(name(to))))
                };
                reply.add_answer(cname("alias.test.", "mid.test."));
                reply.add_answer(cname("mid.test.", "end.test."));
                reply.add_answer(a("end.test.", 50, [192, 0, 2, 20]));
                reply.add_answer(a("other.test.", 50, [198, 51, 100, 9]));
            }
            ("big.test", RecordType::A) => {
                for i in 0..BIG_RECORDS {
                    reply.add_answer(a("big.test.", 60, [10, 0, 0, i as u8]));
                }
            }
            ("evil.test", _) => {
                reply.add_answer(a("evil.test.", 60, [203, 0, 113, 66]));
            }
            ("short.test", RecordType::A) => {
                reply.add_answer(a("short.test.", 1, [192, 0, 2, 5]));
            }
            ("gone.test", _) => {
                reply.set_response_code(ResponseCode::NXDomain);
                reply.add_name_server(soa(60, 1));
            }
            ("empty.test", _) => {
                reply.add_name_server(soa(60, 30));
            }
            ("fail.test", _) => {
                reply.set_response_code(ResponseCode::ServFail);
            }
            _ => {
                reply.set_response_code(ResponseCode::NXDomain);
            }
        }
        reply
    }

    async fn read_framed(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut msg).await?;
        Ok(msg)
    }

    async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
        let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(msg);
        stream.write_all(&framed).await
    }

    // ----- clients -----

    /// Sends raw bytes over UDP; the answer, if one comes within `wait`.
    async fn udp_raw(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("client bind");
        socket.send_to(bytes, server).await.expect("client send");
        let mut buf = vec![0u8; MAX_MESSAGE];
        match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
            Ok(Ok((len, from))) => {
                assert_eq!(from, server, "answer from the address asked");
                Some(buf[..len].to_vec())
            }
            _ => None,
        }
    }

    async fn udp_ask(server: SocketAddr, m: &Message) -> Message {
        udp_ask_raw(server, &m.to_vec().expect("encode")).await
    }

    /// Sends raw bytes over UDP; the DNS answer, which must come.
    async fn udp_ask_raw(server: SocketAddr, bytes: &[u8]) -> Message {
        let bytes = udp_raw(server, bytes, Duration::from_secs(5))
            .await
            .expect("an answer over udp");
        Message::from_vec(&bytes).expect("a DNS answer")
    }

    /// Which query a reply answers, and how.
    fn id_and_rcode(m: &Message) -> (u16, ResponseCode) {
        (m.id(), m.response_code())
    }

    async fn tcp_ask(stream: &mut TcpStream, m: &Message) -> Message {
        write_framed(stream, &m.to_vec().expect("encode"))
            .await
            .expect("tcp send");
        let bytes = tokio::time::timeout(Duration::from_secs(5), read_framed(stream))
            .await
            .expect("tcp answer in time")
            .expect("tcp answer");
        Message::from_vec(&bytes).expect("a DNS answer")
    }

    fn answer_ips(m: &Message) -> Vec<IpAddr> {
        m.answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }

    fn ip(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    // ----- the proxy under test -----

    const TIMEOUT: Duration = Duration::from_millis(300);

    /// A proxy under test, the gate it asks, and the port its subjects'
    /// addresses listen on. Derefs to the [`DnsProxy`].
    struct TestProxy {
        proxy: DnsProxy,
        gate: Arc<FakeGate>,
        port: u16,
    }

    impl std::ops::Deref for TestProxy {
        type Target = DnsProxy;
        fn deref(&self) -> &DnsProxy {
            &self.proxy
        }
    }

    impl TestProxy {
        /// Serves subject 7 from `upstreams`, with the default limits and
        /// cache.
        async fn start(upstreams: Vec<SocketAddr>, gate: Arc<FakeGate>) -> Self {
            Self::serving(upstreams, gate, &[7], Limits::default()).await
        }

        /// Serves `subjects` with the default cache.
        async fn serving(
            upstreams: Vec<SocketAddr>,
            gate: Arc<FakeGate>,
            subjects: &[u32],
            limits: Limits,
        ) -> Self {
            Self::caching(upstreams, gate, subjects, limits, DEFAULT_CACHE_ENTRIES).await
        }

        /// Serves `subjects` with a cache of `cache_entries` (0: none), on a
        /// random high port (retried while taken, so tests and concurrent
        /// runs do not collide).
        async fn caching(
            upstreams: Vec<SocketAddr>,
            gate: Arc<FakeGate>,
            subjects: &[u32],
            limits: Limits,
            cache_entries: u64,
        ) -> Self {
            for _ in 0..50 {
                let port = rand::random::<u16>() % 30000 + 30000;
                let config = ProxyConfig {
                    port,
                    upstreams: upstreams.clone(),
                    timeout: TIMEOUT,
                    cache_entries,
                };
                let proxy = DnsProxy::with_limits(config, gate.clone(), limits);
                let mut ok = true;
                for &s in subjects {
                    if let Err(e) = proxy.add_subject(s).await {
                        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
                        ok = false;
                        break;
                    }
                }
                if ok {
                    return Self { proxy, gate, port };
                }
            }
            panic!("no free port for the DNS proxy");
        }

        /// `subject`'s resolver address.
        fn at(&self, subject: u32) -> SocketAddr {
            at(subject, self.port)
        }

        /// Subject 7 asks over UDP; the answer.
        async fn ask(&self, id: u16, qname: &str, qtype: RecordType) -> Message {
            self.ask_as(7, id, qname, qtype).await
        }

        /// `subject` asks over UDP; the answer.
        async fn ask_as(&self, subject: u32, id: u16, qname: &str, qtype: RecordType) -> Message {
            udp_ask(self.at(subject), &query(id, qname, qtype)).await
        }

        /// A TCP connection to `subject`'s address.
        async fn connect(&self, subject: u32) -> TcpStream {
            TcpStream::connect(self.at(subject)).await.expect("connect")
        }
    }

    /// The usual set-up: a [`FakeUpstream`], and a proxy relaying to it
    /// for subject 7, which may resolve `names`. Keep the upstream bound
    /// (`_upstream`, not `_`): dropping it stops it.
    async fn proxy_for(names: &[&'static str]) -> (FakeUpstream, TestProxy) {
        let allowed: Vec<(u32, &'static str)> = names.iter().map(|n| (7, *n)).collect();
        proxy_with(FakeGate::allowing(&allowed)).await
    }

    /// [`proxy_for`] with the gate `gate`.
    async fn proxy_with(gate: Arc<FakeGate>) -> (FakeUpstream, TestProxy) {
        let upstream = FakeUpstream::start().await;
        let p = TestProxy::start(vec![upstream.addr], gate).await;
        (upstream, p)
    }

    fn at(subject: u32, port: u16) -> SocketAddr {
        SocketAddr::from((subject_addr(subject), port))
    }

    /// A UDP "upstream" that answers the first query it gets with
    /// `replies(query)`, one datagram each, in order; then ends.
    async fn one_shot_upstream(
        replies: impl FnOnce(&[u8]) -> Vec<Vec<u8>> + Send + 'static,
    ) -> (SocketAddr, JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_MESSAGE];
            let (len, peer) = socket.recv_from(&mut buf).await.expect("query");
            for reply in replies(&buf[..len]) {
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        (addr, task)
    }

    /// An address where nothing listens (UDP or TCP).
    async fn closed_port() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        s.local_addr().expect("addr")
    }

    /// `q` with EDNS, announcing room for `max_payload` bytes.
    fn with_edns(mut q: Message, max_payload: u16) -> Message {
        let mut edns = Edns::new();
        edns.set_max_payload(max_payload);
        q.set_edns(edns);
        q
    }

    /// What the gate is told when `subject` learns one IPv4 address.
    fn learned(subject: u32, name: &str, v4: [u8; 4], ttl: u32) -> Call {
        Call::Learned(subject, name.into(), vec![(ip(v4), ttl)])
    }

    /// SERVFAIL, and not one address of the answer in it.
    fn assert_fails_closed(reply: &Message) {
        assert_eq!(reply.response_code(), ResponseCode::ServFail);
        assert!(reply.answers().is_empty(), "no address leaks out");
    }

    /// The reply seen at `replied_at` left only after `learned()` returned
    /// (the gate's `learn_delay` makes a reply that did not wait visible).
    fn assert_learned_before(gate: &FakeGate, replied_at: Instant) {
        let learned_at = lock(&gate.learned_at).expect("learned was called");
        assert!(
            learned_at <= replied_at,
            "the reply left before learned() returned"
        );
    }

    // ----- tests -----

    #[test]
    fn subject_addresses_carry_the_id_in_127_64_0_0_10() {
        assert_eq!(subject_addr(7), Ipv4Addr::new(127, 64, 0, 7));
        assert_eq!(subject_addr(0x1234), Ipv4Addr::new(127, 64, 0x12, 0x34));
        assert_eq!(subject_addr(MAX_SUBJECT), Ipv4Addr::new(127, 127, 255, 255));
        for s in [1, 7, 8, 0x3_0000, MAX_SUBJECT] {
            assert_eq!(subject_of(subject_addr(s)), Some(s));
        }
        assert_eq!(subject_of(Ipv4Addr::new(127, 0, 0, 1)), None);
        assert_eq!(subject_of(Ipv4Addr::new(127, 63, 255, 255)), None);
        assert_eq!(subject_of(Ipv4Addr::new(127, 128, 0, 0)), None);
        assert_eq!(subject_of(Ipv4Addr::new(10, 64, 0, 7)), None);
    }

    #[test]
    fn resolv_conf_nameservers_become_upstreams_except_our_own() {
        let text = "\
# generated
search example.com
nameserver 1.1.1.1
nameserver 127.64.0.7   # a subject address: ours, skipped
nameserver ::ffff:127.64.0.8
nameserver 2001:4860:4860::8888
  nameserver   9.9.9.9 ; trailing comment
;nameserver 8.8.8.8
nameserver not-an-address
nameserver
options ndots:2 timeout:1
nameserver fe80::1%1
nameserver 1.1.1.1
nameserver 127.0.0.53
";
        let got = upstreams_from_resolv_conf(text);
        let v6 = |s: &str, scope| {
            SocketAddr::V6(SocketAddrV6::new(s.parse().expect("v6"), 53, 0, scope))
        };
        assert_eq!(
            got,
            vec![
                "1.1.1.1:53".parse().expect("addr"),
                v6("2001:4860:4860::8888", 0),
                "9.9.9.9:53".parse().expect("addr"),
                v6("fe80::1", 1),
                "127.0.0.53:53".parse().expect("addr"),
            ]
        );
        assert!(upstreams_from_resolv_conf("").is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allowed_name_is_relayed_with_the_client_id_after_it_was_learned() {
        let (upstream, p) = proxy_with(FakeGate::slow_to_learn(&[(7, "a.test")])).await;

        // Mixed case and the trailing dot are not part of the judged name.
        let reply = p.ask(0x1234, "A.Test.", RecordType::A).await;
        let replied_at = Instant::now();

        assert_eq!(reply.id(), 0x1234);
        assert_eq!(reply.message_type(), MessageType::Response);
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert_eq!(answer_ips(&reply), vec![ip([192, 0, 2, 1])]);
        assert_eq!(
            p.gate.calls(),
            vec![
                Call::MayResolve(7, "a.test".into()),
                learned(7, "a.test", [192, 0, 2, 1], 300),
            ]
        );
        assert_learned_before(&p.gate, replied_at);
        assert_eq!(upstream.udp_queries.load(Ordering::SeqCst), 1);

        let reply = p.ask(0xbeef, "a.test", RecordType::AAAA).await;
        assert_eq!(reply.id(), 0xbeef);
        let v6: IpAddr = "2001:db8::1".parse().expect("v6");
        assert_eq!(answer_ips(&reply), vec![v6]);
        assert_eq!(
            p.gate.learned().last(),
            Some(&Call::Learned(7, "a.test".into(), vec![(v6, 300)]))
        );

        let stats = p.stats();
        assert_eq!(
            (stats.queries, stats.forwarded, stats.refused, stats.failed),
            (2, 2, 0, 0)
        );
    }

    #[tokio::test]
    async fn disallowed_name_is_refused_without_asking_upstream() {
        let (upstream, p) = proxy_for(&["a.test"]).await;

        let reply = p.ask(0x4242, "Evil.test", RecordType::TXT).await;

        assert_eq!(reply.id(), 0x4242);
        assert_eq!(reply.response_code(), ResponseCode::Refused);
        assert!(reply.recursion_available());
        assert!(reply.recursion_desired());
        assert!(reply.answers().is_empty());
        assert_eq!(
            reply.queries(),
            query(0, "Evil.test.", RecordType::TXT).queries()
        );
        assert_eq!(
            p.gate.calls(),
            vec![
                Call::MayResolve(7, "evil.test".into()),
                Call::Refused(7, "evil.test".into(), "TXT".into()),
            ]
        );
        assert_eq!(upstream.received(), 0);
        assert_eq!(p.stats().refused, 1);
        assert_eq!(p.stats().forwarded, 0);
    }

    #[tokio::test]
    async fn refusal_keeps_edns_for_clients_that_sent_it() {
        let p = TestProxy::start(vec![], FakeGate::allowing(&[])).await;
        let q = with_edns(query(9, "evil.test", RecordType::A), 4096);
        let reply = udp_ask(p.at(7), &q).await;
        assert_eq!(reply.response_code(), ResponseCode::Refused);
        assert!(reply.extensions().is_some());
    }

    #[tokio::test]
    async fn learning_failure_fails_closed_with_servfail() {
        let (_upstream, p) = proxy_with(FakeGate::failing_to_learn(&[(7, "a.test")])).await;

        let reply = p.ask(77, "a.test", RecordType::A).await;

        assert_eq!(reply.id(), 77);
        assert_fails_closed(&reply);
        assert_eq!(p.gate.learned().len(), 1);
        assert_eq!(p.stats().failed, 1);
    }

    #[tokio::test]
    async fn closed_upstream_gives_servfail_quickly() {
        let p = TestProxy::start(
            vec![closed_port().await],
            FakeGate::allowing(&[(7, "a.test")]),
        )
        .await;

        let started = Instant::now();
        let reply = p.ask(5, "a.test", RecordType::A).await;

        assert_eq!(reply.response_code(), ResponseCode::ServFail);
        assert_eq!(reply.id(), 5);
        assert!(
            started.elapsed() < TIMEOUT * 2,
            "took {:?}",
            started.elapsed()
        );
        assert!(p.gate.learned().is_empty());
        assert_eq!(p.stats().failed, 1);
    }

    #[tokio::test]
    async fn silent_upstream_gives_servfail_after_the_timeout() {
        // Bound but never answering.
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let p = TestProxy::start(
            vec![silent.local_addr().expect("addr")],
            FakeGate::allowing(&[(7, "a.test")]),
        )
        .await;

        let started = Instant::now();
        let reply = p.ask(6, "a.test", RecordType::A).await;
        let took = started.elapsed();

        assert_eq!(reply.response_code(), ResponseCode::ServFail);
        assert!(took >= TIMEOUT, "answered before the timeout: {took:?}");
        assert!(took < TIMEOUT * 3, "took {took:?}");
    }

    #[tokio::test]
    async fn next_upstream_is_tried_when_one_fails() {
        let upstream = FakeUpstream::start().await;
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let p = TestProxy::start(
            vec![silent.local_addr().expect("addr"), upstream.addr],
            FakeGate::allowing(&[(7, "b.test")]),
        )
        .await;

        let reply = p.ask(8, "b.test", RecordType::A).await;

        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert_eq!(answer_ips(&reply), vec![ip([192, 0, 2, 2])]);
    }

    #[tokio::test]
    async fn upstream_answers_with_the_wrong_id_are_ignored() {
        // An "upstream" that first answers with a forged id and a bad
        // address, then correctly.
        let (liar_addr, liar_task) = one_shot_upstream(|q| {
            let q = Message::from_vec(q).expect("query");
            let mut forged = fake_answer(&q);
            forged.set_id(q.id().wrapping_add(1));
            forged.take_answers();
            forged.add_answer(a("b.test.", 60, [203, 0, 113, 66]));
            let real = fake_answer(&q).to_vec().expect("encode");
            vec![forged.to_vec().expect("encode"), real]
        })
        .await;
        let p = TestProxy::start(vec![liar_addr], FakeGate::allowing(&[(7, "b.test")])).await;

        let reply = p.ask(10, "b.test", RecordType::A).await;

        assert_eq!(answer_ips(&reply), vec![ip([192, 0, 2, 2])]);
        assert_eq!(
            p.gate.learned(),
            vec![learned(7, "b.test", [192, 0, 2, 2], 30)]
        );
        liar_task.await.expect("liar ran");
    }

    #[tokio::test]
    async fn answers_are_reencoded_so_patched_fields_never_change_a_name() {
        // An upstream whose second record's owner name is a compression
        // pointer into the first record's TTL (legal: any earlier offset).
        // TTL 0x0161003c reads as the name "a."; a cache hit rewrites the
        // TTL, and the patched bytes would read as "." (or not parse at
        // all: found by fuzzing). Served bytes must say what was judged.
        let (odd_addr, odd_task) = one_shot_upstream(|q| {
            let qname_end = cache::question_name_end(q).expect("plain question");
            let mut r = q[..qname_end + 4].to_vec();
            r[2] = 0x81; // QR, RD
            r[3] = 0x80; // RA
            r[4..12].copy_from_slice(&[0, 1, 0, 2, 0, 0, 0, 0]);
            let first_ttl = r.len() + 6;
            // b.test A 127.0.0.5, TTL 0x0161003c.
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0x01, 0x61, 0x00, 0x3c, 0, 4]);
            r.extend_from_slice(&[127, 0, 0, 5]);
            // "a." (the pointer into the TTL) A 127.0.0.6, TTL 60.
            let ptr = u16::try_from(first_ttl).expect("offset") | 0xc000;
            r.extend_from_slice(&ptr.to_be_bytes());
            r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 6]);
            let parsed = Message::from_vec(&r).expect("the upstream's bytes parse");
            assert_eq!(parsed.answers()[1].name(), &name("a."));
            vec![r]
        })
        .await;
        let p = TestProxy::caching(
            vec![odd_addr],
            FakeGate::allowing(&[(7, "b.test")]),
            &[7],
            Limits::default(),
            16,
        )
        .await;

        let fresh = p.ask(1, "b.test", RecordType::A).await;
        let cached = p.ask(2, "b.test", RecordType::A).await;

        assert_eq!(p.stats().cache_hits, 1, "the second answer is a hit");
        for reply in [&fresh, &cached] {
            let owners: Vec<&Name> = reply.answers().iter().map(|r| r.name()).collect();
            assert_eq!(owners, [&name("b.test."), &name("a.")]);
        }
        assert!(
            cached.answers()[0].ttl() <= 60,
            "the smallest TTL bounds the life"
        );
        odd_task.await.expect("upstream ran");
    }

    #[tokio::test]
    async fn tcp_queries_share_a_connection() {
        let (_upstream, p) = proxy_for(&["a.test", "b.test"]).await;

        let mut stream = p.connect(7).await;
        let first = tcp_ask(&mut stream, &query(1, "a.test", RecordType::A)).await;
        let second = tcp_ask(&mut stream, &query(2, "b.test", RecordType::A)).await;
        let third = tcp_ask(&mut stream, &query(3, "evil.test", RecordType::A)).await;

        assert_eq!(
            (first.id(), answer_ips(&first)),
            (1, vec![ip([192, 0, 2, 1])])
        );
        assert_eq!(
            (second.id(), answer_ips(&second)),
            (2, vec![ip([192, 0, 2, 2])])
        );
        assert_eq!(id_and_rcode(&third), (3, ResponseCode::Refused));
        assert_eq!(p.gate.learned().len(), 2);
    }

    #[tokio::test]
    async fn cname_chain_addresses_are_learned_under_the_asked_name() {
        let (_upstream, p) = proxy_for(&["alias.test"]).await;

        let reply = p.ask(11, "alias.test", RecordType::A).await;

        // The client gets the whole answer; only the chain's address is
        // learned, not the unrelated record the upstream added.
        assert_eq!(reply.answers().len(), 4);
        assert_eq!(
            p.gate.learned(),
            vec![learned(7, "alias.test", [192, 0, 2, 20], 50)]
        );
    }

    #[tokio::test]
    async fn nxdomain_is_relayed_and_nothing_is_learned() {
        let (_upstream, p) = proxy_for(&["missing.test"]).await;

        let reply = p.ask(12, "missing.test", RecordType::A).await;

        assert_eq!(reply.response_code(), ResponseCode::NXDomain);
        assert!(p.gate.learned().is_empty());
    }

    #[tokio::test]
    async fn large_answer_is_truncated_over_udp_and_complete_over_tcp() {
        let (upstream, p) = proxy_for(&["big.test"]).await;

        let raw = udp_raw(
            p.at(7),
            &query(13, "big.test", RecordType::A)
                .to_vec()
                .expect("encode"),
            Duration::from_secs(5),
        )
        .await
        .expect("udp answer");
        assert!(raw.len() <= UDP_PLAIN_MAX, "{} bytes over udp", raw.len());
        let cut = Message::from_vec(&raw).expect("answer");
        assert_eq!(cut.id(), 13);
        assert!(cut.truncated());
        assert!(cut.answers().is_empty());
        assert_eq!(
            cut.queries(),
            query(0, "big.test.", RecordType::A).queries()
        );
        // The proxy itself had to go to TCP upstream for the full answer.
        assert!(upstream.tcp_queries.load(Ordering::SeqCst) >= 1);
        assert_eq!(p.stats().truncated, 1);

        let mut stream = p.connect(7).await;
        let full = tcp_ask(&mut stream, &query(14, "big.test", RecordType::A)).await;
        assert_eq!(full.id(), 14);
        assert!(!full.truncated());
        assert_eq!(answer_ips(&full).len(), BIG_RECORDS);
        let Some(Call::Learned(7, name, learned)) = p.gate.learned().pop() else {
            panic!("nothing learned");
        };
        assert_eq!(name, "big.test");
        assert_eq!(learned.len(), BIG_RECORDS);
        assert!(learned.iter().all(|(_, ttl)| *ttl == 60));
    }

    #[tokio::test]
    async fn udp_client_edns_size_is_honoured() {
        let (_upstream, p) = proxy_for(&["big.test"]).await;

        let q = with_edns(query(15, "big.test", RecordType::A), 4096);
        let reply = udp_ask(p.at(7), &q).await;

        assert!(!reply.truncated());
        assert_eq!(answer_ips(&reply).len(), BIG_RECORDS);
    }

    #[tokio::test]
    async fn two_subjects_are_told_apart_by_address() {
        let upstream = FakeUpstream::start().await;
        let p = TestProxy::serving(
            vec![upstream.addr],
            FakeGate::allowing(&[(7, "a.test"), (8, "b.test")]),
            &[7, 8],
            Limits::default(),
        )
        .await;
        assert_eq!(p.subjects(), vec![7, 8]);

        let seven_a = p.ask(1, "a.test", RecordType::A).await;
        let eight_a = p.ask_as(8, 2, "a.test", RecordType::A).await;
        let eight_b = p.ask_as(8, 3, "b.test", RecordType::A).await;

        assert_eq!(seven_a.response_code(), ResponseCode::NoError);
        assert_eq!(eight_a.response_code(), ResponseCode::Refused);
        assert_eq!(eight_b.response_code(), ResponseCode::NoError);
        let calls = p.gate.calls();
        assert!(calls.contains(&learned(7, "a.test", [192, 0, 2, 1], 300)));
        assert!(calls.contains(&Call::Refused(8, "a.test".into(), "A".into())));
        assert!(calls.contains(&learned(8, "b.test", [192, 0, 2, 2], 30)));
        assert!(
            !calls
                .iter()
                .any(|c| matches!(c, Call::Learned(8, n, _) if n == "a.test"))
        );
    }

    #[tokio::test]
    async fn removed_subject_is_no_longer_answered_and_can_come_back() {
        let upstream = FakeUpstream::start().await;
        let p = TestProxy::serving(
            vec![upstream.addr],
            FakeGate::allowing(&[(9, "a.test")]),
            &[9],
            Limits::default(),
        )
        .await;
        // Adding again is a no-op.
        p.add_subject(9).await.expect("idempotent add");
        assert_eq!(p.subjects(), vec![9]);
        let q = query(21, "a.test", RecordType::A);
        assert_eq!(
            udp_ask(p.at(9), &q).await.response_code(),
            ResponseCode::NoError
        );

        p.remove_subject(9);
        p.remove_subject(9);
        assert!(p.subjects().is_empty());
        // Let the runtime drop the aborted tasks (and their sockets).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let bytes = q.to_vec().expect("encode");
        assert_eq!(udp_raw(p.at(9), &bytes, TIMEOUT).await, None);
        assert!(TcpStream::connect(p.at(9)).await.is_err());

        p.add_subject(9)
            .await
            .expect("add back on the same address");
        assert_eq!(
            udp_ask(p.at(9), &q).await.response_code(),
            ResponseCode::NoError
        );
    }

    #[tokio::test]
    async fn remove_then_add_at_once_rebinds() {
        let p = TestProxy::serving(vec![], FakeGate::allowing(&[]), &[10], Limits::default()).await;
        for _ in 0..5 {
            p.remove_subject(10);
            p.add_subject(10).await.expect("rebind right after removal");
        }
        let reply = p.ask_as(10, 1, "x.test", RecordType::A).await;
        assert_eq!(reply.response_code(), ResponseCode::Refused);
    }

    #[tokio::test]
    async fn subject_ids_without_an_address_are_refused() {
        let proxy = DnsProxy::new(ProxyConfig::default(), FakeGate::allowing(&[]));
        let err = proxy
            .add_subject(MAX_SUBJECT + 1)
            .await
            .expect_err("too large");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(proxy.subjects().is_empty());
    }

    #[tokio::test]
    async fn malformed_queries_get_formerr_or_nothing() {
        let (upstream, p) = proxy_for(&["a.test", "evil.test"]).await;
        let server = p.at(7);

        // A header announcing a question that is not there.
        let cut = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        let reply = udp_ask_raw(server, &cut).await;
        assert_eq!(id_and_rcode(&reply), (0xabcd, ResponseCode::FormErr));

        // No id to answer to.
        assert_eq!(udp_raw(server, &[0xab], TIMEOUT).await, None);

        // No question.
        let mut empty = Message::new();
        empty.set_id(31);
        let reply = udp_ask(server, &empty).await;
        assert_eq!(id_and_rcode(&reply), (31, ResponseCode::FormErr));

        // A question name that ends in a compression pointer into the
        // header: the upstream, sent these bytes under a new id, would read
        // another name than the gate judged (fuzz/regressions/
        // dns_message-question-pointer-into-id).
        let pointer = [
            0x00, 0x2a, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 4, b't', b'e', b's', b't',
            0xc0, 0x00, 0, 1, 0, 1,
        ];
        let reply = udp_ask_raw(server, &pointer).await;
        assert_eq!(id_and_rcode(&reply), (0x2a, ResponseCode::FormErr));

        // Two questions: the second would not be judged.
        let mut two = query(32, "a.test", RecordType::A);
        two.add_query(Query::query(name("evil.test"), RecordType::A));
        let reply = udp_ask(server, &two).await;
        assert_eq!(id_and_rcode(&reply), (32, ResponseCode::FormErr));

        // Not a query.
        let mut update = query(33, "a.test", RecordType::A);
        update.set_op_code(OpCode::Update);
        let reply = udp_ask(server, &update).await;
        assert_eq!(id_and_rcode(&reply), (33, ResponseCode::NotImp));

        // A response sent to the proxy is not answered.
        let mut response = query(34, "a.test", RecordType::A);
        response.set_message_type(MessageType::Response);
        let bytes = response.to_vec().expect("encode");
        assert_eq!(udp_raw(server, &bytes, TIMEOUT).await, None);

        assert_eq!(upstream.received(), 0);
        assert!(p.gate.calls().is_empty());
        assert_eq!(p.stats().malformed, 7);
    }

    #[tokio::test]
    async fn tcp_connections_beyond_the_bound_are_closed() {
        let limits = Limits {
            tcp_connections: 2,
            ..Limits::default()
        };
        let p = TestProxy::serving(vec![], FakeGate::allowing(&[]), &[7], limits).await;
        let mut held = Vec::new();
        for id in 0..2 {
            let mut s = p.connect(7).await;
            // A round trip proves the connection is being served.
            let r = tcp_ask(&mut s, &query(id, "x.test", RecordType::A)).await;
            assert_eq!(r.response_code(), ResponseCode::Refused);
            held.push(s);
        }
        let mut third = p.connect(7).await;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "third connection served: {read:?}"
        );
        assert_eq!(p.stats().dropped, 1);

        // A freed slot is usable again.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = p.connect(7).await;
        let r = tcp_ask(&mut again, &query(9, "x.test", RecordType::A)).await;
        assert_eq!(r.response_code(), ResponseCode::Refused);
    }

    #[tokio::test]
    async fn idle_tcp_connections_are_closed() {
        let limits = Limits {
            tcp_idle: Duration::from_millis(200),
            ..Limits::default()
        };
        let p = TestProxy::serving(vec![], FakeGate::allowing(&[]), &[7], limits).await;
        let mut stream = p.connect(7).await;
        // Half a length prefix, then nothing.
        stream.write_all(&[0]).await.expect("write");
        let started = Instant::now();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)));
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    // ----- the answer cache -----

    fn answer_ttls(m: &Message) -> Vec<u32> {
        m.answers().iter().map(|r| r.ttl()).collect()
    }

    #[tokio::test]
    async fn cached_answer_is_served_within_its_ttl_and_still_learned() {
        let (upstream, p) = proxy_for(&["a.test"]).await;

        let first = p.ask(1, "a.test", RecordType::A).await;
        let second = p.ask(2, "A.Test", RecordType::A).await;

        assert_eq!(upstream.received(), 1, "the second query was not sent on");
        assert_eq!(second.id(), 2);
        assert_eq!(second.response_code(), ResponseCode::NoError);
        assert_eq!(answer_ips(&second), answer_ips(&first));
        assert_eq!(
            second.queries(),
            query(0, "A.Test.", RecordType::A).queries(),
            "the question as this client asked it"
        );
        assert!(second.recursion_available());
        assert!(!second.authoritative());
        // Judged and learned for both queries, in that order.
        let learned = learned(7, "a.test", [192, 0, 2, 1], 300);
        let ask = Call::MayResolve(7, "a.test".into());
        assert_eq!(
            p.gate.calls(),
            vec![ask.clone(), learned.clone(), ask, learned]
        );
        let stats = p.stats();
        assert_eq!(
            (stats.cache_hits, stats.cache_misses, stats.forwarded),
            (1, 1, 1)
        );
        assert_eq!(*lock(&p.gate.cache_lookups), (1, 1));
        assert_eq!(p.cache_len(), 1);

        // Over TCP too, and another type is another entry.
        let mut stream = p.connect(7).await;
        let third = tcp_ask(&mut stream, &query(3, "a.test", RecordType::A)).await;
        assert_eq!(answer_ips(&third), vec![ip([192, 0, 2, 1])]);
        assert_eq!(upstream.received(), 1);
        p.ask(4, "a.test", RecordType::AAAA).await;
        assert_eq!(upstream.received(), 2);
    }

    #[tokio::test]
    async fn cached_ttls_count_down() {
        let (upstream, p) = proxy_for(&["a.test"]).await;

        let first = p.ask(1, "a.test", RecordType::A).await;
        assert_eq!(answer_ttls(&first), vec![300]);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let later = p.ask(2, "a.test", RecordType::A).await;

        assert_eq!(upstream.received(), 1);
        let ttl = answer_ttls(&later)[0];
        assert!((297..=298).contains(&ttl), "TTL {ttl} after 2 s");
        // The address is opened for what is left of the answer's life.
        assert_eq!(
            p.gate.learned().last(),
            Some(&learned(7, "a.test", [192, 0, 2, 1], ttl))
        );
    }

    #[tokio::test]
    async fn cached_answer_expires_with_its_ttl() {
        let (upstream, p) = proxy_for(&["short.test"]).await;

        let q = query(1, "short.test", RecordType::A);
        let first = udp_ask(p.at(7), &q).await;
        let hit = udp_ask(p.at(7), &q).await;
        assert_eq!(upstream.received(), 1);
        assert_eq!(answer_ttls(&first), vec![1]);
        assert_eq!(answer_ttls(&hit), vec![1], "never served with TTL 0");

        tokio::time::sleep(Duration::from_millis(1100)).await;
        let fresh = udp_ask(p.at(7), &q).await;
        assert_eq!(upstream.received(), 2, "expired: asked upstream again");
        assert_eq!(answer_ips(&fresh), vec![ip([192, 0, 2, 5])]);
        assert_eq!((p.stats().cache_hits, p.stats().cache_misses), (1, 2));
    }

    #[tokio::test]
    async fn negative_answers_are_cached_for_the_soa_minimum_only_with_an_soa() {
        let (upstream, p) = proxy_for(&["gone.test", "empty.test", "missing.test"]).await;

        // NXDOMAIN with an SOA (MINIMUM 1 s): cached for 1 s.
        let gone = query(1, "gone.test", RecordType::A);
        let first = udp_ask(p.at(7), &gone).await;
        let hit = udp_ask(p.at(7), &gone).await;
        assert_eq!(upstream.received(), 1);
        assert_eq!(hit.response_code(), ResponseCode::NXDomain);
        assert_eq!(first.name_servers()[0].ttl(), 60);
        assert_eq!(
            hit.name_servers()[0].ttl(),
            1,
            "the SOA says how long the name is missing (RFC 2308 §5)"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        udp_ask(p.at(7), &gone).await;
        assert_eq!(upstream.received(), 2);

        // NODATA with an SOA (TTL 60, MINIMUM 30): 30 s.
        let empty = query(2, "empty.test", RecordType::AAAA);
        udp_ask(p.at(7), &empty).await;
        let hit = udp_ask(p.at(7), &empty).await;
        assert_eq!(upstream.received(), 3);
        assert_eq!(hit.response_code(), ResponseCode::NoError);
        assert!(hit.answers().is_empty());
        assert_eq!(hit.name_servers()[0].ttl(), 30);

        // NXDOMAIN without an SOA: not cached.
        let missing = query(3, "missing.test", RecordType::A);
        udp_ask(p.at(7), &missing).await;
        let again = udp_ask(p.at(7), &missing).await;
        assert_eq!(again.response_code(), ResponseCode::NXDomain);
        assert_eq!(upstream.received(), 5);
        assert!(p.gate.learned().is_empty());
    }

    #[tokio::test]
    async fn servfail_is_never_cached() {
        let (upstream, p) = proxy_for(&["fail.test"]).await;

        for id in 0..3 {
            let r = p.ask(id, "fail.test", RecordType::A).await;
            assert_eq!(r.response_code(), ResponseCode::ServFail);
        }
        assert_eq!(upstream.received(), 3);
        assert_eq!(p.cache_len(), 0);
        let stats = p.stats();
        assert_eq!(
            (stats.cache_hits, stats.cache_misses, stats.failed),
            (0, 3, 3)
        );
    }

    #[tokio::test]
    async fn the_cache_holds_at_most_its_bound_and_0_turns_it_off() {
        let upstream = FakeUpstream::start().await;
        let names = ["a.test", "b.test", "alias.test", "evil.test", "short.test"];
        let allowed: Vec<(u32, &'static str)> = names.iter().map(|n| (7, *n)).collect();
        let p = TestProxy::caching(
            vec![upstream.addr],
            FakeGate::allowing(&allowed),
            &[7],
            Limits::default(),
            2,
        )
        .await;
        for round in 0..3 {
            for (i, n) in names.iter().enumerate() {
                let r = p.ask(round * 10 + i as u16, n, RecordType::A).await;
                assert_eq!(r.response_code(), ResponseCode::NoError, "{n}");
            }
        }
        // moka applies the bound in its housekeeping (batched on writes
        // and reads), so between runs a few extra entries may still hit.
        assert!(p.cache_len() <= 2, "{} entries", p.cache_len());
        let stats = p.stats();
        assert_eq!(stats.cache_hits + stats.cache_misses, 15);

        let p = TestProxy::caching(
            vec![upstream.addr],
            FakeGate::allowing(&[(7, "a.test")]),
            &[7],
            Limits::default(),
            0,
        )
        .await;
        let before = upstream.received();
        for id in 0..3 {
            p.ask(id, "a.test", RecordType::A).await;
        }
        assert_eq!(upstream.received() - before, 3);
        let stats = p.stats();
        assert_eq!(
            (stats.cache_hits, stats.cache_misses, stats.cached),
            (0, 0, 0)
        );
        assert_eq!(*lock(&p.gate.cache_lookups), (0, 0));
        assert_eq!(p.gate.learned().len(), 3);
    }

    /// The cache holds content, never a decision: a name another subject's
    /// query put there is still refused to a subject whose tools do not name
    /// it, and a subject that may ask still gets the addresses opened for
    /// itself before the cached reply leaves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cached_name_is_judged_and_learned_per_subject() {
        let upstream = FakeUpstream::start().await;
        let p = TestProxy::serving(
            vec![upstream.addr],
            FakeGate::slow_to_learn(&[(7, "a.test"), (9, "a.test")]),
            &[7, 8, 9],
            Limits::default(),
        )
        .await;

        let seven = p.ask(1, "a.test", RecordType::A).await;
        assert_eq!(seven.response_code(), ResponseCode::NoError);
        assert_eq!(upstream.received(), 1);
        assert_eq!(p.cache_len(), 1);

        // Subject 8: cached, but not its name.
        for transport in [Transport::Udp, Transport::Tcp] {
            let q = query(2, "a.test", RecordType::A);
            let eight = match transport {
                Transport::Udp => udp_ask(p.at(8), &q).await,
                Transport::Tcp => {
                    let mut s = p.connect(8).await;
                    tcp_ask(&mut s, &q).await
                }
            };
            assert_eq!(
                eight.response_code(),
                ResponseCode::Refused,
                "{transport:?}"
            );
            assert!(
                eight.answers().is_empty(),
                "no address leaks from the cache"
            );
        }

        // Subject 9: allowed, answered from the cache, learned for 9.
        let nine = p.ask_as(9, 3, "a.test", RecordType::A).await;
        let replied_at = Instant::now();
        assert_eq!(nine.response_code(), ResponseCode::NoError);
        assert_eq!(answer_ips(&nine), vec![ip([192, 0, 2, 1])]);
        assert_eq!(upstream.received(), 1, "9 was answered from the cache");
        assert_learned_before(&p.gate, replied_at);

        let calls = p.gate.calls();
        assert_eq!(
            calls,
            vec![
                Call::MayResolve(7, "a.test".into()),
                learned(7, "a.test", [192, 0, 2, 1], 300),
                Call::MayResolve(8, "a.test".into()),
                Call::Refused(8, "a.test".into(), "A".into()),
                Call::MayResolve(8, "a.test".into()),
                Call::Refused(8, "a.test".into(), "A".into()),
                Call::MayResolve(9, "a.test".into()),
                learned(9, "a.test", [192, 0, 2, 1], 300),
            ]
        );
        let stats = p.stats();
        // Refusals never look at the cache.
        assert_eq!(
            (stats.cache_hits, stats.cache_misses, stats.refused),
            (1, 1, 2)
        );
    }

    #[tokio::test]
    async fn a_cached_answer_still_fails_closed_when_learning_fails() {
        let (upstream, p) = proxy_with(FakeGate::failing_to_learn(&[(7, "a.test")])).await;
        for id in 0..2 {
            let r = p.ask(id, "a.test", RecordType::A).await;
            assert_fails_closed(&r);
        }
        assert_eq!(upstream.received(), 1, "the answer itself was cached");
        assert_eq!(p.stats().cache_hits, 1);
        assert_eq!(p.gate.learned().len(), 2);
    }

    #[tokio::test]
    async fn a_large_cached_answer_is_truncated_over_udp() {
        let (upstream, p) = proxy_for(&["big.test"]).await;
        let mut stream = p.connect(7).await;
        let full = tcp_ask(&mut stream, &query(1, "big.test", RecordType::A)).await;
        assert_eq!(answer_ips(&full).len(), BIG_RECORDS);

        let cut = p.ask(2, "big.test", RecordType::A).await;
        assert_eq!(cut.id(), 2);
        assert!(cut.truncated());
        assert!(cut.answers().is_empty());
        assert_eq!(p.stats().cache_hits, 1);
        // UDP (truncated), then TCP for the first query only.
        assert_eq!(upstream.received(), 2);
    }
}
