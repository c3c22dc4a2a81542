//! The per-agent DNS proxy's handling of one query, end to end through its
//! public API: a `DnsProxy` serving subjects on 127.64.x.y, a gate, and a
//! fake upstream on 127.0.0.1 whose answer the input shapes.
//!
//! The proxy's decision functions (`Shared::answer_now`, `Shared::answer`)
//! are private, so queries go over real loopback sockets (UDP, or TCP with
//! length framing). Besides "no panic", the round checks what the proxy
//! promises:
//! - a reply is a DNS response that parses and carries the query's id;
//! - nothing reaches the upstream, and no answer record reaches the
//!   client, unless the gate allowed the name; what the upstream is sent
//!   parses, and asks for a name the gate allowed (the proxy forwards the
//!   client's bytes with a new id: the id must not change their meaning);
//! - only allowed names are learned;
//! - when learning fails, the client gets SERVFAIL (fail closed).
//!
//! Input: byte 0 flags, bytes 1..3 query length (u16 BE), the query, then
//! the upstream answer template.
//! - flags & 1: ask over TCP (else UDP);
//! - flags & 2: the gate allows every name (else `ok.test` and its subdomains);
//! - flags & 4: `learned` fails;
//! - flags & 8: the upstream answer is the template's header, the forwarded
//!   question, then the template's bytes after its header (so answer
//!   records can point at the question name, offset 12);
//! - flags & 16: ask the second proxy, which has an answer cache (4
//!   entries) shared by two subjects; flags & 32 picks the second subject.
//!   The first proxy has no cache, so its rounds do not depend on earlier
//!   inputs; a crash with 16 set may need the inputs before it.
//!
//! The upstream answers every forwarded query with the template (its id and
//! QR bit patched; an empty template echoes the query as an empty answer),
//! and over UDP then also with that echo, so the proxy never waits for its
//! upstream timeout.
//!
//! Before the round, the same answer goes through an answer cache
//! directly (`cache::key`, `AnswerCache::insert`, `get`), as the proxy
//! would store it (re-encoded): a hit must parse, carry the query's id and
//! question bytes, say the same records, and no TTL may grow.
#![no_main]

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use agent_guard::daemon::dns::{
    cache::{self, AnswerCache},
    proxy::{DnsGate, DnsProxy, MAX_SUBJECT, ProxyConfig, subject_addr},
};
use hickory_resolver::proto::{
    op::{Message, MessageType},
    rr::Name,
    serialize::binary::BinEncodable as _,
};
use libfuzzer_sys::fuzz_target;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    runtime::Runtime,
};

/// How long a reply may take before the round counts as hung. The proxy's
/// own upstream timeout is far below it.
const DEADLINE: Duration = Duration::from_secs(10);
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(300);
const MAX_MESSAGE: usize = 65535;

/// What one input sets up and what the gate and the upstream saw.
#[derive(Default)]
struct Round {
    allow_all: bool,
    fail_learning: bool,
    splice: bool,
    template: Vec<u8>,
    allowed: Vec<String>,
    learned: Vec<String>,
    upstream_queries: usize,
    /// The question names the upstream parsed out of what it was sent,
    /// judged like the proxy judges them (`None`: it did not parse).
    upstream_names: Vec<Option<String>>,
    cache_hits: usize,
}

static ROUND: Mutex<Option<Round>> = Mutex::new(None);

fn round() -> MutexGuard<'static, Option<Round>> {
    ROUND.lock().unwrap_or_else(|p| p.into_inner())
}

struct Gate;

impl DnsGate for Gate {
    fn may_resolve(&self, _subject: u32, name: &str) -> bool {
        let mut guard = round();
        let Some(r) = guard.as_mut() else {
            return false;
        };
        let ok = r.allow_all || name == "ok.test" || name.ends_with(".ok.test");
        if ok {
            r.allowed.push(name.to_string());
        }
        ok
    }

    fn learned(&self, _subject: u32, name: &str, _answers: &[(IpAddr, u32)]) -> Result<(), String> {
        let mut guard = round();
        let Some(r) = guard.as_mut() else {
            return Err("no round".into());
        };
        r.learned.push(name.to_string());
        if r.fail_learning {
            Err("fuzz: learning fails".into())
        } else {
            Ok(())
        }
    }

    fn refused(&self, _subject: u32, _name: &str, _qtype: &str) {}

    fn cache_lookup(&self, _subject: u32, hit: bool) {
        if hit && let Some(r) = round().as_mut() {
            r.cache_hits += 1;
        }
    }
}

/// The query with QR set: an answer with no records that matches it.
fn echo(request: &[u8]) -> Vec<u8> {
    let mut r = request.to_vec();
    if r.len() > 2 {
        r[2] |= 0x80;
    }
    r
}

/// The upstream's answer to `request` and the echo to send after it (see
/// the module docs).
fn upstream_answer(request: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut guard = round();
    let Some(r) = guard.as_mut() else {
        return (echo(request), echo(request));
    };
    r.upstream_queries += 1;
    r.upstream_names.push(
        Message::from_vec(request)
            .ok()
            .and_then(|m| m.queries().first().map(|q| judged_name(q.name()))),
    );
    shape_answer(request, &r.template, r.splice)
}

/// The name the proxy's gate judges: ASCII, lowercase, no trailing dot
/// (the proxy's private `judged_name`).
fn judged_name(name: &Name) -> String {
    let mut s = name.to_ascii();
    s.make_ascii_lowercase();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

/// What the upstream answers to `request` for this template.
fn shape_answer(request: &[u8], template: &[u8], splice: bool) -> (Vec<u8>, Vec<u8>) {
    if template.is_empty() {
        return (echo(request), echo(request));
    }
    let mut out = if splice && template.len() >= 12 {
        let question = Message::from_vec(request)
            .ok()
            .and_then(|m| m.queries().first().and_then(|q| q.to_bytes().ok()));
        let Some(question) = question else {
            return (echo(request), echo(request));
        };
        let mut out = template[..12].to_vec();
        out[4..6].copy_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&question);
        out.extend_from_slice(&template[12..]);
        out
    } else {
        template.to_vec()
    };
    if out.len() >= 2 && request.len() >= 2 {
        out[..2].copy_from_slice(&request[..2]);
    }
    if out.len() > 2 {
        out[2] |= 0x80;
    }
    out.truncate(MAX_MESSAGE);
    (out, echo(request))
}

async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let msg = &msg[..msg.len().min(MAX_MESSAGE)];
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(u16::MAX).to_be_bytes());
    framed.extend_from_slice(msg);
    stream.write_all(&framed).await
}

/// A fake upstream (UDP and TCP on one 127.0.0.1 port).
async fn start_upstream() -> SocketAddr {
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind upstream udp");
        let addr = udp.local_addr().expect("upstream addr");
        if let Ok(tcp) = TcpListener::bind(addr).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().expect("upstream addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_MESSAGE];
        while let Ok((len, peer)) = udp.recv_from(&mut buf).await {
            let (answer, fallback) = upstream_answer(&buf[..len]);
            let _ = udp.send_to(&answer, peer).await;
            if answer != fallback {
                let _ = udp.send_to(&fallback, peer).await;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            tokio::spawn(async move {
                while let Ok(request) = read_framed(&mut stream).await {
                    let (answer, _) = upstream_answer(&request);
                    if write_framed(&mut stream, &answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A proxy and the addresses of the subjects it serves.
struct Served {
    proxy: DnsProxy,
    servers: Vec<SocketAddr>,
}

struct Env {
    rt: Runtime,
    plain: Served,
    cached: Served,
}

/// A proxy serving `subjects` consecutive subject ids on some free port.
async fn start_proxy(upstream: SocketAddr, cache_entries: u64, subjects: u32) -> Served {
    let pid = std::process::id();
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    'attempt: for attempt in 0..200u32 {
        let mix = pid.wrapping_mul(2_654_435_761) ^ clock ^ attempt.wrapping_mul(40_503);
        let first = mix % (MAX_SUBJECT - subjects) + 1;
        let port = u16::try_from(20_000 + (mix >> 7) % 40_000).expect("port below 60000");
        let config = ProxyConfig {
            port,
            upstreams: vec![upstream],
            timeout: UPSTREAM_TIMEOUT,
            cache_entries,
        };
        let proxy = DnsProxy::new(config, Arc::new(Gate));
        let mut servers = Vec::new();
        for subject in first..first + subjects {
            if proxy.add_subject(subject).await.is_err() {
                continue 'attempt;
            }
            servers.push(SocketAddr::from((subject_addr(subject), port)));
        }
        return Served { proxy, servers };
    }
    panic!("no free address for the DNS proxy");
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (plain, cached) = rt.block_on(async {
            let upstream = start_upstream().await;
            (
                start_proxy(upstream, 0, 1).await,
                start_proxy(upstream, 4, 2).await,
            )
        });
        Env { rt, plain, cached }
    })
}

/// Whether the proxy must answer this datagram (it stays silent on
/// responses and on unparsable bytes without an id or marked as a response).
fn must_answer(query: &[u8]) -> bool {
    match Message::from_vec(query) {
        Ok(m) => m.message_type() == MessageType::Query,
        Err(_) => query.len() >= 3 && query[2] & 0x80 == 0,
    }
}

async fn ask_udp(proxy: &DnsProxy, server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let must = must_answer(query);
    let before = proxy.stats().malformed;
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("client bind");
    socket.send_to(query, server).await.expect("client send");
    let mut buf = vec![0u8; MAX_MESSAGE];
    let start = Instant::now();
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (len, from) = received.expect("client receive");
                assert_eq!(from, server, "reply from another address");
                return Some(buf[..len].to_vec());
            }
            () = tokio::task::yield_now() => {
                // Silence is only known once the proxy counted the query
                // as malformed.
                if !must && proxy.stats().malformed > before {
                    return None;
                }
                assert!(
                    start.elapsed() < DEADLINE,
                    "no reply over udp within {DEADLINE:?} (must answer: {must})"
                );
            }
        }
    }
}

async fn ask_tcp(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect(server).await.expect("client connect");
        write_framed(&mut stream, query).await.expect("client send");
        // The proxy closes the connection instead of answering: None.
        read_framed(&mut stream).await.ok()
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| panic!("no reply or close over tcp within {DEADLINE:?}"))
}

/// End of the question name at offset 12, in plain labels.
fn question_end(b: &[u8]) -> Option<usize> {
    let mut i = 12;
    loop {
        match *b.get(i)? {
            0 => return Some(i + 1),
            len @ 1..=63 => i += 1 + usize::from(len),
            _ => return None,
        }
    }
}

/// The answer cache on its own: store the upstream's answer to `query` the
/// way the proxy does (only an answer that matches the question), then
/// serve it back to the same query.
fn cache_step(query: &[u8], template: &[u8], splice: bool) {
    let Ok(request) = Message::from_vec(query) else {
        return;
    };
    let [question] = request.queries() else {
        return;
    };
    if request.message_type() != MessageType::Query {
        return;
    }
    let Some(key) = cache::key(query, &request) else {
        return;
    };
    let (bytes, _) = shape_answer(query, template, splice);
    let Ok(answer) = Message::from_vec(&bytes) else {
        return;
    };
    // The proxy's `matching_answer`: a response to our id and question.
    let matches = answer.message_type() == MessageType::Response
        && answer.id() == request.id()
        && match answer.queries() {
            [q] => {
                q.name() == question.name()
                    && q.query_type() == question.query_type()
                    && q.query_class() == question.query_class()
            }
            _ => false,
        };
    if !matches {
        return;
    }
    // What the proxy caches: the answer as its own encoder writes it
    // (`UpstreamAnswer::new`), never the upstream's bytes.
    let Ok(bytes) = answer.to_vec() else {
        return;
    };
    // One cache for all inputs (building one is costly): inserting replaces
    // an entry under the same key, so the hit below is this input's answer.
    static CACHE: OnceLock<AnswerCache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| AnswerCache::new(4096));
    if !cache.insert(key.clone(), &bytes, &answer, question.query_type(), &[]) {
        return;
    }
    let Some(hit) = cache.get(&key, query) else {
        return;
    };
    let served = Message::from_vec(&hit.bytes)
        .unwrap_or_else(|e| panic!("a cached answer does not parse when served: {e}"));
    assert_eq!(hit.bytes[..2], query[..2], "cached answer with another id");
    let end = question_end(query).expect("a keyed query has a plain name") + 4;
    assert_eq!(
        hit.bytes.get(12..end),
        query.get(12..end),
        "cached answer with another question"
    );
    let records = |m: &Message| {
        m.answers()
            .iter()
            .chain(m.name_servers())
            .chain(m.additionals())
            .map(|r| r.ttl())
            .collect::<Vec<_>>()
    };
    let (before, after) = (records(&answer), records(&served));
    assert_eq!(
        before.len(),
        after.len(),
        "cached answer with other records"
    );
    for (old, new) in before.iter().zip(&after) {
        assert!(
            *new <= (*old).max(1),
            "a cached TTL grew from {old} to {new}"
        );
    }
    // Patching id, flags and TTLs must not change what a record says.
    let content = |m: &Message| {
        m.answers()
            .iter()
            .chain(m.name_servers())
            .chain(m.additionals())
            .map(|r| (r.name().to_lowercase(), r.record_type(), r.data().clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        content(&answer),
        content(&served),
        "a cached answer says something else when served"
    );
}

/// `AGENT_GUARD_FUZZ_VERBOSE=1`: print what each input led to (for seeds
/// and crash reproducers; slows fuzzing down).
fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("AGENT_GUARD_FUZZ_VERBOSE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_at_checked(3) else {
        return;
    };
    let flags = head[0];
    let len = usize::from(u16::from_be_bytes([head[1], head[2]])).min(rest.len());
    let (query, template) = rest.split_at(len);
    let tcp = flags & 1 != 0;
    cache_step(query, template, flags & 8 != 0);
    let env = env();
    let served = if flags & 16 != 0 {
        &env.cached
    } else {
        &env.plain
    };
    let server = served.servers[usize::from(flags & 32 != 0) % served.servers.len()];
    *round() = Some(Round {
        allow_all: flags & 2 != 0,
        fail_learning: flags & 4 != 0,
        splice: flags & 8 != 0,
        template: template.to_vec(),
        ..Round::default()
    });
    let started = Instant::now();
    let reply = env.rt.block_on(async {
        if tcp {
            ask_tcp(server, query).await
        } else {
            ask_udp(&served.proxy, server, query).await
        }
    });
    let r = round().take().expect("the round");
    if verbose() {
        let answer = reply.as_deref().map(|b| match Message::from_vec(b) {
            Ok(m) => format!(
                "{} {} answers, tc {}",
                m.response_code(),
                m.answers().len(),
                m.truncated()
            ),
            Err(e) => format!("unparsable: {e}"),
        });
        eprintln!(
            "dns: {} query of {} bytes to {server}: allowed {:?}, upstream asked {} times \
             for {:?}, cache hits {}, learned {:?}, reply {answer:?} after {:?}",
            if tcp { "tcp" } else { "udp" },
            query.len(),
            r.allowed,
            r.upstream_queries,
            r.upstream_names,
            r.cache_hits,
            r.learned,
            started.elapsed()
        );
    }

    if let Some(reply) = &reply {
        let parsed = Message::from_vec(reply)
            .unwrap_or_else(|e| panic!("the proxy replied with bytes that do not parse: {e}"));
        assert_eq!(
            parsed.message_type(),
            MessageType::Response,
            "reply is not a response"
        );
        if query.len() >= 2 {
            assert_eq!(reply[..2], query[..2], "reply with another id");
        }
        if r.allowed.is_empty() {
            assert!(
                parsed.answers().is_empty(),
                "answer records for a query the gate refused"
            );
        }
    }
    if r.upstream_queries > 0 {
        assert!(
            !r.allowed.is_empty(),
            "the upstream was asked for a name the gate refused"
        );
    }
    for name in &r.upstream_names {
        assert!(
            name.as_ref().is_some_and(|n| r.allowed.contains(n)),
            "the upstream was sent a query for {name:?} (None: unparsable), \
             but the gate judged {:?}",
            r.allowed
        );
    }
    for name in &r.learned {
        assert!(
            r.allowed.contains(name),
            "learned {name:?}, which the gate refused"
        );
    }
    if r.fail_learning
        && !r.learned.is_empty()
        && let Some(reply) = &reply
    {
        assert!(reply.len() >= 4, "reply shorter than a DNS header");
        assert_eq!(
            reply[3] & 0x0f,
            2,
            "learning failed but the answer was relayed (not SERVFAIL)"
        );
    }
});
