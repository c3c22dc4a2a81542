//! Records and questions for the DNS tests ([`super::cache`] and
//! [`super::proxy`] build the same fake zone's records).

use std::net::Ipv4Addr;

use hickory_resolver::proto::{
    op::{Message, Query},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, SOA},
    },
};

pub fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("name")
}

pub fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

/// The fake zone's SOA record (TTL `ttl`, MINIMUM `minimum`).
pub fn soa(ttl: u32, minimum: u32) -> Record {
    let rdata = SOA::new(
        name("ns.test."),
        name("admin.test."),
        1,
        3600,
        600,
        86400,
        minimum,
    );
    Record::from_rdata(name("test."), ttl, RData::SOA(rdata))
}

/// A recursive query for `qname`/`qtype` with id `id`.
pub fn query(id: u16, qname: &str, qtype: RecordType) -> Message {
    let mut m = Message::new();
    m.set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(name(qname), qtype));
    m
}
