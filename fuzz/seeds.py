#!/usr/bin/env python3
"""Writes the binary seed inputs of the dns_message, audit_record and token
fuzz targets into fuzz/corpus/<target>/seed-*. The policy and
control_request seeds are plain text files, edited by hand, and
token/seed-cli-issued is a real token from
`agent-guard token issue --key K --tenant acme --agent researcher --tools search
--ttl 15m --on-behalf-of alice@example.com --jti cli-1 --aud node-1`
with K = 32 bytes of 0x01 (a key of acme in the target's ring), "now" = its iat.

Each target's module docs describe its input layout; this script follows
them. Run it from anywhere: python3 fuzz/seeds.py
"""

import base64
import hashlib
import json
import struct
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"


def write(target, name, data):
    path = CORPUS / target / f"seed-{name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ----- dns_message: flags, u16 BE query length, query, upstream template -----

TCP, ALLOW_ALL, FAIL_LEARNING, SPLICE, CACHED, SECOND_SUBJECT = 1, 2, 4, 8, 16, 32


def qname(name):
    out = b""
    for label in name.split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def header(id_, flags, qd=1, an=0, ns=0, ar=0):
    return struct.pack(">HHHHHH", id_, flags, qd, an, ns, ar)


def query(id_, name, qtype=1, flags=0x0100, edns=None, extra_questions=()):
    q = qname(name) + struct.pack(">HH", qtype, 1)
    for n in extra_questions:
        q += qname(n) + struct.pack(">HH", 1, 1)
    ar = 0
    tail = b""
    if edns is not None:
        ar = 1
        # OPT: root name, type 41, class = payload size, ttl 0, no options.
        tail = b"\0" + struct.pack(">HHIH", 41, edns, 0, 0)
    return header(id_, flags, 1 + len(extra_questions), 0, 0, ar) + q + tail


def rr(owner, rtype, ttl, rdata):
    return owner + struct.pack(">HHIH", rtype, 1, ttl, len(rdata)) + rdata


def dns_seed(flags, q, template=b""):
    return bytes([flags]) + struct.pack(">H", len(q)) + q + template


def dns_seeds():
    www = query(0x1234, "www.ok.test")
    # Spliced answers: the question (www.ok.test) sits at offset 12, its
    # "ok.test" at 16; the answer section starts at 12 + 13 + 4 = 29.
    cname = rr(b"\xc0\x0c", 5, 300, b"\x03cdn\xc0\x10")  # www.ok.test CNAME cdn.ok.test
    cdn_owner = bytes([0xC0, 29 + 12])  # the "cdn" label inside the CNAME's rdata
    a = rr(cdn_owner, 1, 60, bytes([93, 184, 216, 34]))
    aaaa = rr(b"\xc0\x0c", 28, 60, bytes.fromhex("20010db8000000000000000000000001"))
    unrelated = rr(b"\x05other\xc0\x10", 1, 60, bytes([10, 0, 0, 9]))
    answers = header(0, 0x8180, 1, 4) + cname + a + aaaa + unrelated
    write("dns_message", "allowed-empty-answer", dns_seed(0, www))
    write("dns_message", "allowed-cname-chain", dns_seed(SPLICE, www, answers))
    write("dns_message", "allowed-cname-chain-tcp", dns_seed(SPLICE | TCP, www, answers))
    write("dns_message", "learning-fails", dns_seed(SPLICE | FAIL_LEARNING, www, answers))
    write(
        "dns_message",
        "nxdomain",
        dns_seed(SPLICE, query(7, "gone.ok.test", 28), header(0, 0x8183, 1, 0)),
    )
    write(
        "dns_message",
        "upstream-servfail",
        dns_seed(SPLICE, query(8, "ok.test"), header(0, 0x8182, 1, 0)),
    )
    # 40 A records: over 512 bytes, cut with TC over UDP unless EDNS allows it.
    many = header(0, 0x8180, 1, 40) + b"".join(
        rr(b"\xc0\x0c", 1, 30, bytes([10, 1, 0, i])) for i in range(40)
    )
    write("dns_message", "big-answer-udp", dns_seed(SPLICE | ALLOW_ALL, query(9, "big.example"), many))
    write(
        "dns_message",
        "big-answer-edns",
        dns_seed(SPLICE | ALLOW_ALL, query(10, "big.example", edns=4096), many),
    )
    # The upstream says truncated: the proxy asks again over TCP.
    write(
        "dns_message",
        "upstream-truncated",
        dns_seed(SPLICE, query(11, "tc.ok.test"), header(0, 0x8380, 1, 0)),
    )
    write("dns_message", "refused", dns_seed(0, query(12, "evil.example", 16)))
    write("dns_message", "refused-edns-tcp", dns_seed(TCP, query(13, "evil.example", edns=1232)))
    write("dns_message", "two-questions", dns_seed(0, query(14, "a.ok.test", extra_questions=["evil.example"])))
    write("dns_message", "no-question", dns_seed(0, header(15, 0x0100, 0)))
    write("dns_message", "cut-question", dns_seed(0, header(16, 0x0100, 1)))
    write("dns_message", "update-opcode", dns_seed(0, query(17, "a.ok.test", flags=0x2800)))
    write("dns_message", "response-to-proxy", dns_seed(0, query(18, "a.ok.test", flags=0x8180)))
    write("dns_message", "no-id", dns_seed(0, b"\xab"))
    # A dot inside a label and a non-ASCII byte: judged as `we\.ird.\233.ok.test`.
    weird = b"\x06we.ird\x01\xe9\x02ok\x04test\x00" + struct.pack(">HH", 1, 1)
    write("dns_message", "escaped-name", dns_seed(ALLOW_ALL, header(19, 0x0100) + weird))
    write("dns_message", "empty-tcp", dns_seed(TCP, b""))
    # Through the proxy with an answer cache, from either of its subjects.
    write("dns_message", "cached-cname-chain", dns_seed(SPLICE | CACHED, www, answers))
    write("dns_message", "cached-other-subject-tcp",
          dns_seed(SPLICE | CACHED | SECOND_SUBJECT | TCP, www, answers))
    write("dns_message", "cached-learning-fails",
          dns_seed(SPLICE | CACHED | SECOND_SUBJECT | FAIL_LEARNING, www, answers))
    write("dns_message", "cached-nxdomain",
          dns_seed(SPLICE | CACHED, query(7, "gone.ok.test", 28), header(0, 0x8183, 1, 0)))


# ----- audit_record: flags, then files separated by NUL -----

RELINK, RESIGN, FOLLOW, NO_KEYS, VERIFY_DIR = 1, 2, 4, 8, 16
GENESIS = "0" * 64


def record(seq, kind, **fields):
    r = {"seq": seq, "ts": f"2026-11-23T10:48:{seq % 60:02d}.405829951Z", "kind": kind}
    r.update(fields)
    return r


def chain(records, prev=GENESIS):
    """Links the records as the writer does (hash over prev, newline and the
    record's JSON without hash); returns the lines and the last hash."""
    lines = []
    for r in records:
        r = dict(r)
        r["prev"] = prev
        body = json.dumps(r, separators=(",", ":"), ensure_ascii=False)
        h = hashlib.sha256((prev + "\n" + body).encode()).hexdigest()
        r["hash"] = h
        lines.append(json.dumps(r, separators=(",", ":"), ensure_ascii=False))
        prev = h
    return lines, prev


def connect(seq, verdict="allow", dst="127.0.0.1", port=18081, reason=None):
    f = dict(tenant="acme", agent="researcher", subject="acme/researcher", pid=18642,
             ppid=18553, uid=0, comm="python3", exe="/usr/bin/python3", cgroup=101,
             dst=dst, port=port, proto="tcp", verdict=verdict)
    if reason:
        f["reason"] = reason
    return record(seq, "connect", **f)


def checkpoint(kind, seq, hash_):
    return json.dumps({"kind": kind, "chain": "acme", "seq": seq, "hash": hash_,
                       "ts": "2026-11-23T10:50:00.000000000Z", "key": "00" * 32,
                       "sig": "00" * 64}, separators=(",", ":"))


def audit_seed(flags, current, checkpoints=None, rotated=()):
    parts = ["\n".join(current) + ("\n" if current else "")]
    if checkpoints is not None or rotated:
        parts.append("\n".join(checkpoints or []) + ("\n" if checkpoints else ""))
    for lines in rotated:
        parts.append("\n".join(lines) + "\n")
    return bytes([flags]) + "\0".join(parts).encode()


def audit_seeds():
    recs = [
        record(0, "daemon_start", detail="agent-guard 0.1.0", policy_hash="a1b2c3d4e5f60718"),
        record(1, "exec", tenant="acme", agent="researcher", subject="acme/researcher", pid=18642,
               comm="python3", exe="/usr/bin/python3", task="summarise ticket 42", task_id="t-1"),
        connect(2),
        connect(3, "deny", port=18082, reason="no_capability"),
        record(4, "grant", tenant="acme", agent="researcher", tool="payments", grant="g-7",
               on_behalf_of="alice@example.com", jti="j-1"),
        record(5, "gap", lost={"connect": 3, "exec": 1}),
        record(6, "approval", tenant="acme", approval="a-1", approver="alice", op="approve",
               uid=1001, divergence=True, child=18700),
    ]
    lines, _ = chain(recs)
    write("audit_record", "intact-chain", audit_seed(0, lines))
    write("audit_record", "one-record", audit_seed(0, lines[:1]))
    # An edited field; a removed line; swapped lines.
    edited = list(lines)
    edited[2] = edited[2].replace('"port":18081', '"port":18082')
    write("audit_record", "edited", audit_seed(0, edited))
    write("audit_record", "removed", audit_seed(0, lines[:2] + lines[3:]))
    write("audit_record", "swapped", audit_seed(0, lines[:2] + [lines[3], lines[2]] + lines[4:]))
    # A torn line acknowledged by a gap record, and a torn tail.
    torn = lines[2][:40]
    gap, _ = chain([record(2, "gap", torn_bytes=len(torn.encode()))], prev=json.loads(lines[1])["hash"])
    write("audit_record", "torn-acknowledged", audit_seed(0, lines[:2] + [torn] + gap))
    write("audit_record", "torn-tail", bytes([0]) + ("\n".join(lines) + "\n" + torn).encode())
    # Rotated files, checkpoints and an anchor: re-linked and re-signed by
    # the target (flags), so their hashes and signatures are right.
    write("audit_record", "rotated-with-checkpoints",
          audit_seed(RELINK | RESIGN | FOLLOW, lines[4:],
                     [checkpoint("checkpoint", 1, ""), checkpoint("checkpoint", 5, "")],
                     rotated=[lines[:2], lines[2:4]]))
    write("audit_record", "anchor",
          audit_seed(RELINK | RESIGN | FOLLOW, lines[3:],
                     [checkpoint("anchor", 3, ""), checkpoint("checkpoint", 6, "")]))
    write("audit_record", "checkpoint-past-the-end",
          audit_seed(RELINK | RESIGN | FOLLOW | VERIFY_DIR, lines[:3],
                     [checkpoint("checkpoint", 2, ""), checkpoint("checkpoint", 9, "0" * 64)]))
    write("audit_record", "forged-checkpoint",
          audit_seed(RELINK, lines, [checkpoint("checkpoint", 2, "ab" * 32)]))
    write("audit_record", "no-keys",
          audit_seed(RELINK | RESIGN | NO_KEYS | VERIFY_DIR, lines, [checkpoint("checkpoint", 2, "")]))


# ----- token: flags, u16 LE skew, u64 LE now, token text -----

ACME_KEY, GLOBEX_KEY, NOBODYS_KEY, NODE_2 = 1, 2, 3, 4


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(header_obj, claims, sig=b"\0" * 64):
    h = b64(json.dumps(header_obj, separators=(",", ":")).encode())
    c = b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{h}.{c}.{b64(sig)}"


def token_seed(flags, now, text, skew=30):
    return bytes([flags]) + struct.pack("<HQ", skew, now) + text.encode()


def token_seeds():
    claims = {"tenant": "acme", "agent": "researcher", "tools": ["search"], "exp": 2000,
              "nbf": 900, "iat": 900, "jti": "j1", "on_behalf_of": "alice@example.com",
              "aud": "node-1"}
    jwt = {"alg": "EdDSA", "typ": "JWT"}
    write("token", "acme-signed", token_seed(ACME_KEY, 1000, token(jwt, claims)))
    write("token", "wrong-tenant", token_seed(GLOBEX_KEY, 1000, token(jwt, claims)))
    write("token", "forged", token_seed(NOBODYS_KEY, 1000, token(jwt, claims)))
    write("token", "unsigned", token_seed(0, 1000, token(jwt, claims)))
    write("token", "expired", token_seed(ACME_KEY, 2031, token(jwt, claims)))
    write("token", "not-yet-valid", token_seed(ACME_KEY, 860, token(jwt, claims)))
    write("token", "other-node", token_seed(ACME_KEY | NODE_2, 1000, token(jwt, claims)))
    full = dict(claims, task="summarise ticket 42", ttl=900, aud="*", jti="j-\u00e9")
    write("token", "any-node-kid", token_seed(ACME_KEY | NODE_2, 1000,
                                              token({"alg": "EdDSA", "kid": "k1"}, full)))
    write("token", "alg-none", token_seed(ACME_KEY, 1000, token({"alg": "none"}, claims)))
    write("token", "globex", token_seed(GLOBEX_KEY, 1000, token(jwt, dict(claims, tenant="globex"))))


if __name__ == "__main__":
    dns_seeds()
    audit_seeds()
    token_seeds()
