//! The control socket's request decoder: `serde_json` into
//! `agent_guard::control::Request`, on the raw bytes and the way the server
//! reads them (one line, UTF-8). A decoded request must encode and decode
//! again to the same request (the client and the server share the type).
#![no_main]

use agent_guard::control::{MAX_REQUEST_BYTES, Request};
use libfuzzer_sys::fuzz_target;

fn round_trip(req: &Request) {
    let bytes = serde_json::to_vec(req).expect("a decoded request encodes");
    let again: Request = serde_json::from_slice(&bytes).expect("an encoded request decodes");
    assert_eq!(
        format!("{req:?}"),
        format!("{again:?}"),
        "round trip changed the request"
    );
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_REQUEST_BYTES {
        return;
    }
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        round_trip(&req);
    }
    // The server: `read_line` (up to and including the first newline, UTF-8
    // or an error), then `serde_json::from_str`.
    let line = match data.iter().position(|&b| b == b'\n') {
        Some(end) => &data[..=end],
        None => data,
    };
    if let Ok(line) = std::str::from_utf8(line)
        && let Ok(req) = serde_json::from_str::<Request>(line)
    {
        round_trip(&req);
    }
});
