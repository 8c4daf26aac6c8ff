//! DNS answers as a node receives them from whatever answers its query (`core::dns`): DNS over
//! UDP is not authenticated, so any bytes may arrive.
//!
//! Input: `[qtype selector]` then one datagram, parsed as the answer to the query
//! `encode_query(0x1234, "_clusteros._tcp.site.test", qtype)` (qtype SRV, A or AAAA).
//!
//! Checked: nothing panics; no more records are taken than `MAX_RECORDS`; every name taken fits
//! a DNS name; the addresses made of an answer are well-formed IP:PORT, one per address at most.

#![forbid(unsafe_code)]
#![no_main]

use clusteros::core::dns::{MAX_RECORDS, TYPE_A, TYPE_AAAA, TYPE_SRV, parse_answer, srv_addresses};
use libfuzzer_sys::fuzz_target;

const NAME: &str = "_clusteros._tcp.site.test";

fuzz_target!(|data: &[u8]| {
    let Some((&sel, datagram)) = data.split_first() else { return };
    let qtype = [TYPE_SRV, TYPE_A, TYPE_AAAA][usize::from(sel % 3)];
    let Ok(answer) = parse_answer(datagram, 0x1234, NAME, qtype) else { return };
    assert!(answer.srv.len() <= MAX_RECORDS && answer.addrs.len() <= MAX_RECORDS);
    for name in answer.srv.iter().map(|s| &s.target).chain(answer.addrs.iter().map(|a| &a.0)) {
        assert!(name.len() <= 255, "a name of {} bytes", name.len());
    }
    let (found, missing) = srv_addresses(&answer.srv, &answer.addrs);
    for a in &found {
        assert!(a.parse::<std::net::SocketAddr>().is_ok(), "{a:?} is not IP:PORT");
    }
    assert!(found.len() <= answer.srv.len() * answer.addrs.len());
    assert!(missing.len() <= answer.srv.len());
});
