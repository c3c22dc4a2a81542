//! The per-agent DNS proxy's answer cache: upstream answers, shared by
//! every subject, keyed by the question.
//!
//! Only the *content* of an answer is cached. Whether a subject may ask,
//! and opening the answer's addresses to that subject, happen in the
//! proxy for every query, cached or not ([`super::proxy`]): a hit replaces
//! the upstream round trip and nothing else.
//!
//! # What is kept, and how long
//!
//! - **Key:** the question's name (wire form, ASCII lowercased), type and
//!   class, plus the request bits that change what an upstream answers:
//!   RD, CD, whether the client sent EDNS, and DO. A DNSSEC-aware client
//!   never gets an answer cached for one that did not ask for signatures,
//!   and a client without EDNS never gets an OPT record.
//! - **Positive answers** (NOERROR with a record of the asked type) live
//!   for the smallest TTL of their records, at most [`MAX_POSITIVE`].
//! - **Negative answers** (NXDOMAIN, or NOERROR without a record of the
//!   asked type: NODATA) live per RFC 2308 §5 for the smaller of the SOA
//!   record's TTL and its MINIMUM field (and of any other record's TTL),
//!   at most [`MAX_NEGATIVE`]; without an SOA in the authority section they
//!   are not cached (RFC 2308 §5).
//! - **Never cached:** other response codes (SERVFAIL, REFUSED, ... never
//!   reach the cache: the proxy does not relay them), truncated answers,
//!   answers with a TTL of 0, signed messages (TSIG, SIG(0)), answers
//!   larger than [`MAX_CACHED_BYTES`], and anything the wire walker below
//!   does not understand.
//! - **Served:** the upstream's bytes as they were, with the client's id,
//!   RD bit and question (its letter case), AA cleared (a cache is not the
//!   authority), AD kept only if the client set AD or DO, every TTL
//!   lowered to min(its TTL, the entry's life) minus the entry's age
//!   (whole seconds, at least 1; the learned addresses' TTLs likewise),
//!   and the OPT record without its options (cookies and the like
//!   belonged to the first asker). An entry whose life has run out is
//!   never served.
//! - **Bounded:** at most `--dns-cache-entries` entries (moka's TinyLFU:
//!   when full, a new answer is admitted only if its name is asked more
//!   often than the entry it would evict, so a burst of one-off names
//!   cannot flush the popular ones). 0 turns the cache off.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_resolver::proto::{
    op::{Message, ResponseCode},
    rr::{RData, RecordType},
};
use moka::sync::Cache;

/// Longest life of a positive answer (the learned addresses' own bound
/// in agent.rs is the same hour).
pub const MAX_POSITIVE: Duration = Duration::from_secs(3600);
/// Longest life of a negative answer (RFC 2308 §5 suggests 1–3 hours; a
/// name that starts to exist should not stay missing for that long).
pub const MAX_NEGATIVE: Duration = Duration::from_secs(300);
/// Larger answers are not cached: with the entry bound this keeps the
/// cache's memory under ~40 MiB at the default 10,000 entries.
pub const MAX_CACHED_BYTES: usize = 4096;

/// DNS header flag bits (RFC 1035 §4.1.1, RFC 4035 §3.2).
const FLAG_AA: u8 = 0x04; // byte 2
const FLAG_RD: u8 = 0x01; // byte 2
const FLAG_AD: u8 = 0x20; // byte 3
const FLAG_CD: u8 = 0x10; // byte 3
/// The request bits in a key's last byte.
const KEY_RD: u8 = 1;
const KEY_CD: u8 = 1 << 1;
const KEY_EDNS: u8 = 1 << 2;
const KEY_DO: u8 = 1 << 3;
const TYPE_OPT: u16 = 41;
const TYPE_TSIG: u16 = 250;
const TYPE_SIG: u16 = 24;

/// What an answer is cached under; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(Box<[u8]>);

/// The cache key of a query (raw bytes and their parse), `None` if the
/// question's name is not in plain wire form (compressed: never sent by a
/// real client, and then simply not cached).
pub fn key(query: &[u8], request: &Message) -> Option<Key> {
    let end = question_name_end(query)?;
    let mut k = Vec::with_capacity(end - 12 + 5);
    k.extend(query[12..end].iter().map(u8::to_ascii_lowercase));
    k.extend_from_slice(query.get(end..end + 4)?);
    let edns = request.extensions().as_ref();
    let bit = |set: bool, bit: u8| if set { bit } else { 0 };
    let bits = bit(request.recursion_desired(), KEY_RD)
        | bit(request.checking_disabled(), KEY_CD)
        | bit(edns.is_some(), KEY_EDNS)
        | bit(edns.is_some_and(|e| e.flags().dnssec_ok), KEY_DO);
    k.push(bits);
    Some(Key(k.into_boxed_slice()))
}

/// A cached answer made ready for one client.
#[derive(Debug)]
pub struct Hit {
    /// The reply, with the client's id.
    pub bytes: Vec<u8>,
    /// A/AAAA of the question's CNAME chain with their remaining TTLs (what
    /// the proxy's `addresses` would find in `bytes`).
    pub learned: Vec<(IpAddr, u32)>,
}

struct Entry {
    /// The upstream's answer; an OPT record (last) without options.
    bytes: Box<[u8]>,
    /// End of the question's name (it starts at offset 12).
    qname_end: usize,
    /// Offsets of every TTL field but the OPT record's.
    ttls: Box<[usize]>,
    /// A/AAAA of the question's CNAME chain with their TTLs as received.
    learned: Box<[(IpAddr, u32)]>,
    /// The askers set DO (part of the key).
    dnssec_ok: bool,
    stored: Instant,
    /// Whole seconds.
    life: u32,
}

/// moka expires an entry when its life is over.
struct Expiry;

impl moka::Expiry<Key, Arc<Entry>> for Expiry {
    fn expire_after_create(&self, _: &Key, entry: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(Duration::from_secs(u64::from(entry.life)))
    }
}

/// See the module documentation. Cheap to share behind an `Arc`; every
/// method takes `&self`.
pub struct AnswerCache {
    entries: Cache<Key, Arc<Entry>>,
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl AnswerCache {
    /// A cache of at most `capacity` answers (at least 1).
    pub fn new(capacity: u64) -> Self {
        Self {
            entries: Cache::builder()
                .max_capacity(capacity.max(1))
                .expire_after(Expiry)
                .build(),
        }
    }

    /// The answer cached under `key`, made ready for the client whose raw
    /// query is `query`; `None` if there is none or its life is over.
    pub fn get(&self, key: &Key, query: &[u8]) -> Option<Hit> {
        let entry = self.entries.get(key)?;
        let age = entry.stored.elapsed().as_secs();
        if age >= u64::from(entry.life) {
            self.entries.invalidate(key);
            return None;
        }
        // age < life <= u32::MAX
        let age = age as u32;
        let remaining = |ttl: u32| ttl.min(entry.life).saturating_sub(age).max(1);
        let bytes = entry.serve(query, &remaining)?;
        let learned = entry
            .learned
            .iter()
            .map(|&(ip, ttl)| (ip, remaining(ttl)))
            .collect();
        Some(Hit { bytes, learned })
    }

    /// Keeps `answer` (its parse, and its bytes as our encoder wrote them:
    /// never an upstream's own bytes, whose compression pointers may point
    /// into the id, flags or TTLs a hit rewrites) if it may be cached;
    /// `learned` is what the proxy learned from it. Returns whether it was
    /// kept.
    pub fn insert(
        &self,
        key: Key,
        bytes: &[u8],
        answer: &Message,
        qtype: RecordType,
        learned: &[(IpAddr, u32)],
    ) -> bool {
        if bytes.len() > MAX_CACHED_BYTES {
            return false;
        }
        let Some(life) = lifetime(answer, qtype) else {
            return false;
        };
        let Some(layout) = layout(bytes) else {
            return false;
        };
        let dnssec_ok = key.0.last().is_some_and(|bits| bits & KEY_DO != 0);
        let mut stored = bytes[..layout.opt.unwrap_or(bytes.len())].to_vec();
        if let Some(opt) = layout.opt {
            // Root name, type, class (payload size), TTL (extended rcode,
            // version, flags); then no options.
            stored.extend_from_slice(&bytes[opt..opt + 9]);
            stored.extend_from_slice(&[0, 0]);
        }
        self.entries.insert(
            key,
            Arc::new(Entry {
                bytes: stored.into_boxed_slice(),
                qname_end: layout.qname_end,
                ttls: layout.ttls.into_boxed_slice(),
                learned: learned.into(),
                dnssec_ok,
                stored: Instant::now(),
                life,
            }),
        );
        true
    }

    /// Entries held (approximate between moka's housekeeping runs).
    pub fn entries(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Entries held, after moka's pending evictions ran (tests).
    #[cfg(test)]
    pub fn settled_len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

impl Entry {
    /// The cached bytes for the client of `query`, TTLs through `ttl`.
    fn serve(&self, query: &[u8], ttl: &dyn Fn(u32) -> u32) -> Option<Vec<u8>> {
        // Same key, so the same labels: only the letter case may differ.
        if question_name_end(query)? != self.qname_end {
            return None;
        }
        let mut out = self.bytes.to_vec();
        out[..2].copy_from_slice(&query[..2]);
        out[2] = (out[2] & !(FLAG_AA | FLAG_RD)) | (query[2] & FLAG_RD);
        if query[3] & FLAG_AD == 0 && !self.dnssec_ok {
            out[3] &= !FLAG_AD;
        }
        out[3] = (out[3] & !FLAG_CD) | (query[3] & FLAG_CD);
        out[12..self.qname_end].copy_from_slice(&query[12..self.qname_end]);
        for &at in &self.ttls {
            let old = u32::from_be_bytes(out[at..at + 4].try_into().ok()?);
            out[at..at + 4].copy_from_slice(&ttl(old).to_be_bytes());
        }
        Some(out)
    }
}

/// How long `answer` (to a question of type `qtype`) may be cached, in
/// whole seconds; `None`: not at all.
fn lifetime(answer: &Message, qtype: RecordType) -> Option<u32> {
    if answer.truncated() || !answer.sig0().is_empty() || !answer.signature().is_empty() {
        return None;
    }
    let code = answer.response_code();
    if !matches!(code, ResponseCode::NoError | ResponseCode::NXDomain) {
        return None;
    }
    let smallest = answer
        .answers()
        .iter()
        .chain(answer.name_servers())
        .chain(answer.additionals())
        .map(|r| r.ttl())
        .min();
    let answered = answer
        .answers()
        .iter()
        .any(|r| r.record_type() == qtype || qtype == RecordType::ANY);
    let life = if code == ResponseCode::NoError && answered {
        smallest?.min(MAX_POSITIVE.as_secs() as u32)
    } else {
        // NXDOMAIN or NODATA: the SOA says for how long (RFC 2308 §5).
        let minimum = answer.name_servers().iter().find_map(|r| match r.data() {
            RData::SOA(soa) => Some(soa.minimum()),
            _ => None,
        })?;
        minimum
            .min(smallest.unwrap_or(u32::MAX))
            .min(MAX_NEGATIVE.as_secs() as u32)
    };
    (life > 0).then_some(life)
}

/// Where the parts a hit rewrites are in an answer's wire form.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    qname_end: usize,
    ttls: Vec<usize>,
    /// Start of the OPT record (always the last record).
    opt: Option<usize>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// End of the question's name, which starts at offset 12 and must be
/// plain labels (no compression pointer).
pub(super) fn question_name_end(b: &[u8]) -> Option<usize> {
    let mut i = 12;
    loop {
        let len = *b.get(i)?;
        match len {
            0 => return Some(i + 1),
            1..=63 => i += 1 + usize::from(len),
            _ => return None,
        }
    }
}

/// Skips a possibly compressed name starting at `i`.
fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *b.get(i)?;
        match len {
            0 => return Some(i + 1),
            1..=63 => i += 1 + usize::from(len),
            0xc0..=0xff => {
                b.get(i + 1)?;
                return Some(i + 2);
            }
            _ => return None,
        }
    }
}

/// Walks a one-question answer: where its TTLs are and where its OPT
/// record starts. `None` for anything unexpected (a second question, an
/// OPT record that is not last or not at the root, TSIG/SIG(0), bytes
/// after the last record).
fn layout(b: &[u8]) -> Option<Layout> {
    if u16_at(b, 4)? != 1 {
        return None;
    }
    let records =
        usize::from(u16_at(b, 6)?) + usize::from(u16_at(b, 8)?) + usize::from(u16_at(b, 10)?);
    let qname_end = question_name_end(b)?;
    let mut i = qname_end + 4;
    let mut ttls = Vec::with_capacity(records);
    let mut opt = None;
    for n in 0..records {
        let start = i;
        i = skip_name(b, i)?;
        let rtype = u16_at(b, i)?;
        let rdlen = usize::from(u16_at(b, i + 8)?);
        match rtype {
            TYPE_OPT => {
                if n + 1 != records || i != start + 1 {
                    return None;
                }
                opt = Some(start);
            }
            TYPE_TSIG => return None,
            TYPE_SIG if n >= records - usize::from(u16_at(b, 10)?) => return None,
            _ => ttls.push(i + 4),
        }
        i += 10 + rdlen;
    }
    (i == b.len()).then_some(Layout {
        qname_end,
        ttls,
        opt,
    })
}

#[cfg(test)]
mod tests {
    use hickory_resolver::proto::{
        op::Edns,
        rr::{Record, rdata::CNAME},
    };

    use super::*;
    use crate::daemon::dns::test_records::{a, name, query, soa};

    fn response(req: &Message) -> Message {
        let mut m = req.clone();
        m.set_message_type(hickory_resolver::proto::op::MessageType::Response)
            .set_recursion_available(true)
            .set_authoritative(true);
        m
    }

    #[test]
    fn lifetimes_follow_ttls_and_rfc_2308() {
        let q = query(7, "a.test.", RecordType::A);
        let mut pos = response(&q);
        pos.add_answer(Record::from_rdata(
            name("a.test."),
            100,
            RData::CNAME(CNAME(name("b.test."))),
        ));
        pos.add_answer(a("b.test.", 40, [192, 0, 2, 1]));
        assert_eq!(lifetime(&pos, RecordType::A), Some(40));
        for r in pos.answers_mut() {
            r.set_ttl(100_000);
        }
        assert_eq!(lifetime(&pos, RecordType::A), Some(3600), "capped");

        // NODATA after the CNAME, and NXDOMAIN: the SOA decides.
        let mut nodata = response(&q);
        nodata.add_answer(Record::from_rdata(
            name("a.test."),
            100,
            RData::CNAME(CNAME(name("b.test."))),
        ));
        assert_eq!(lifetime(&nodata, RecordType::A), None, "no SOA, no caching");
        nodata.add_name_server(soa(60, 30));
        assert_eq!(lifetime(&nodata, RecordType::A), Some(30));
        let mut nx = response(&q);
        nx.set_response_code(ResponseCode::NXDomain);
        nx.add_name_server(soa(20, 900));
        assert_eq!(
            lifetime(&nx, RecordType::A),
            Some(20),
            "SOA TTL below MINIMUM"
        );
        nx.name_servers_mut()[0] = soa(3600, 3600);
        assert_eq!(lifetime(&nx, RecordType::A), Some(300), "capped");
        nx.name_servers_mut()[0] = soa(0, 3600);
        assert_eq!(lifetime(&nx, RecordType::A), None, "TTL 0");

        for code in [
            ResponseCode::ServFail,
            ResponseCode::Refused,
            ResponseCode::FormErr,
            ResponseCode::NotImp,
        ] {
            let mut bad = pos.clone();
            bad.set_response_code(code);
            bad.add_name_server(soa(60, 60));
            assert_eq!(lifetime(&bad, RecordType::A), None, "{code:?}");
        }
        let mut cut = pos.clone();
        cut.set_truncated(true);
        assert_eq!(lifetime(&cut, RecordType::A), None, "truncated");
    }

    #[test]
    fn layout_finds_ttls_and_the_opt_record() {
        let mut q = query(7, "a.test.", RecordType::A);
        q.set_edns(Edns::new());
        let mut r = response(&q);
        r.add_answer(a("a.test.", 300, [192, 0, 2, 1]));
        r.add_answer(a("a.test.", 300, [192, 0, 2, 2]));
        r.add_name_server(soa(60, 60));
        let bytes = r.to_vec().expect("encode");
        let l = layout(&bytes).expect("layout");
        assert_eq!(l.qname_end, 12 + 8);
        assert_eq!(l.ttls.len(), 3);
        for &at in &l.ttls {
            let ttl = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4"));
            assert!(ttl == 300 || ttl == 60, "{ttl} at {at}");
        }
        let opt = l.opt.expect("opt");
        assert_eq!(&bytes[opt..opt + 3], &[0, 0, 41]);
        // Garbage after the records, and a cut record, are refused.
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(layout(&longer), None);
        assert_eq!(layout(&bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn a_hit_is_the_answer_for_the_new_client() {
        let cache = AnswerCache::new(10);
        let mut first = query(7, "A.test.", RecordType::A);
        first.set_id(1);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        first.set_edns(edns);
        let first_bytes = first.to_vec().expect("encode");
        let mut answer = response(&first);
        answer.add_answer(a("A.test.", 300, [192, 0, 2, 1]));
        let bytes = answer.to_vec().expect("encode");
        let key1 = key(&first_bytes, &first).expect("key");
        let learned = [(IpAddr::from([192, 0, 2, 1]), 300)];
        assert!(cache.insert(key1, &bytes, &answer, RecordType::A, &learned));

        let mut second = query(7, "a.TEST.", RecordType::A);
        second.set_id(0xbeef).set_recursion_desired(false);
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        second.set_edns(edns);
        let second_bytes = second.to_vec().expect("encode");
        // RD differs: another key.
        let key2 = key(&second_bytes, &second).expect("key");
        assert!(cache.get(&key2, &second_bytes).is_none());
        second.set_recursion_desired(true);
        let second_bytes = second.to_vec().expect("encode");
        let key2 = key(&second_bytes, &second).expect("key");
        let hit = cache.get(&key2, &second_bytes).expect("hit");
        let reply = Message::from_vec(&hit.bytes).expect("reply");
        assert_eq!(reply.id(), 0xbeef);
        assert!(!reply.authoritative());
        assert_eq!(reply.queries(), second.queries(), "the client's case");
        assert_eq!(reply.queries()[0].name().to_ascii(), "a.TEST.");
        assert_eq!(reply.answers().len(), 1);
        assert_eq!(reply.answers()[0].ttl(), 300);
        assert!(reply.extensions().is_some());
        assert_eq!(hit.learned, learned);

        // Without EDNS, or with DO: other keys, nothing cached.
        let plain = query(7, "a.test.", RecordType::A);
        let plain_bytes = plain.to_vec().expect("encode");
        assert!(
            cache
                .get(&key(&plain_bytes, &plain).expect("key"), &plain_bytes)
                .is_none()
        );
        let mut signed = plain.clone();
        let mut edns = Edns::new();
        edns.flags_mut().dnssec_ok = true;
        signed.set_edns(edns);
        let signed_bytes = signed.to_vec().expect("encode");
        assert_ne!(key(&signed_bytes, &signed), key(&second_bytes, &second));
    }
}
