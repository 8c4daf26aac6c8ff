//! DNS SRV discovery, the pure part: the query a node sends for `_clusteros._tcp.<domain>` (and
//! for the A/AAAA records of the SRV targets), and the parse of the answer, which comes from the
//! network and is treated as hostile: every length and offset is checked, compressed names may
//! not loop, and the number of records taken is bounded. No I/O here (see `adapters::dns`).
//!
//! What DNS gives is only addresses to greet: DNS is not authenticated, and a node joins only
//! nodes that prove the cluster secret, so a forged answer can delay formation but cannot put a
//! node into another cluster.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Record types this module asks for or reads.
pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;

/// At most this many SRV records (and as many addresses) are taken from one answer.
pub const MAX_RECORDS: usize = 64;
/// A compressed name may follow at most this many pointers.
const MAX_POINTERS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("the answer is malformed: {0}")]
    Malformed(&'static str),
    #[error("the answer is for another query (id or question differs)")]
    Mismatch,
    #[error("the answer was truncated (more than 512 bytes over UDP); keep the SRV set small")]
    Truncated,
    #[error("no such name: {0}")]
    NoSuchName(String),
    #[error("the DNS server failed with rcode {rcode} ({what})")]
    Server { rcode: u8, what: &'static str },
}

/// One SRV record (RFC 2782).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// Lower case, without the final dot.
    pub target: String,
    pub ttl: u32,
}

/// What one answer carried: SRV records and addresses (from the answer and additional sections),
/// each as lower-case name without the final dot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    pub srv: Vec<Srv>,
    pub addrs: Vec<(String, IpAddr, u32)>,
}

/// Checks a DNS name as this module accepts it in config: labels of 1-63 letters, digits, '-'
/// and '_' (SRV names begin with `_service._proto`), 253 characters at most, no empty label.
pub fn check_name(name: &str) -> Result<(), String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1-253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("label {label:?} must be 1-63 characters"));
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("label {label:?} may hold only letters, digits, '-' and '_'"));
        }
    }
    Ok(())
}

/// A standard query (recursion desired) for `name` of type `qtype`. `name` must pass
/// [`check_name`].
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    q.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    q.extend_from_slice(&[0; 6]); // AN, NS, AR
    encode_name(&mut q, name);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

fn encode_name(out: &mut Vec<u8>, name: &str) {
    for label in name.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
    }
    out.push(0);
}

/// Parses the answer to the query [`encode_query`]`(id, name, qtype)`.
pub fn parse_answer(bytes: &[u8], id: u16, name: &str, qtype: u16) -> Result<Answer, DnsError> {
    let mut r = Reader { b: bytes, at: 0 };
    let got_id = r.u16()?;
    let flags = r.u16()?;
    let (qd, an, ns, ar) = (r.u16()?, r.u16()?, r.u16()?, r.u16()?);
    if got_id != id || flags & 0x8000 == 0 || qd != 1 {
        return Err(DnsError::Mismatch);
    }
    if flags & 0x0200 != 0 {
        return Err(DnsError::Truncated);
    }
    let want = name.trim_end_matches('.').to_ascii_lowercase();
    let qname = r.name()?;
    let (qt, qc) = (r.u16()?, r.u16()?);
    if qname != want || qt != qtype || qc != CLASS_IN {
        return Err(DnsError::Mismatch);
    }
    match (flags & 0x000f) as u8 {
        0 => {}
        3 => return Err(DnsError::NoSuchName(want)),
        rcode => {
            let what = match rcode {
                1 => "format error",
                2 => "server failure",
                4 => "not implemented",
                5 => "refused",
                _ => "other",
            };
            return Err(DnsError::Server { rcode, what });
        }
    }
    let mut answer = Answer::default();
    for section in [an, ns, ar] {
        for _ in 0..section {
            let owner = r.name()?;
            let (rtype, class, ttl, len) = (r.u16()?, r.u16()?, r.u32()?, usize::from(r.u16()?));
            let end =
                r.at.checked_add(len).filter(|e| *e <= bytes.len()).ok_or(DnsError::Malformed("record length"))?;
            if class == CLASS_IN {
                match rtype {
                    TYPE_SRV if owner == want && answer.srv.len() < MAX_RECORDS => {
                        let (priority, weight, port) = (r.u16()?, r.u16()?, r.u16()?);
                        let target = r.name()?;
                        answer.srv.push(Srv { priority, weight, port, target, ttl });
                    }
                    TYPE_A if len == 4 && answer.addrs.len() < MAX_RECORDS => {
                        let ip = Ipv4Addr::from(<[u8; 4]>::try_from(r.take(4)?).expect("4 bytes"));
                        answer.addrs.push((owner, IpAddr::V4(ip), ttl));
                    }
                    TYPE_AAAA if len == 16 && answer.addrs.len() < MAX_RECORDS => {
                        let ip = Ipv6Addr::from(<[u8; 16]>::try_from(r.take(16)?).expect("16 bytes"));
                        answer.addrs.push((owner, IpAddr::V6(ip), ttl));
                    }
                    _ => {}
                }
            }
            if r.at > end {
                return Err(DnsError::Malformed("record data overruns its length"));
            }
            r.at = end;
        }
    }
    Ok(answer)
}

/// The addresses to greet, as `IP:PORT`, in SRV order (lowest priority first, then highest
/// weight, then name), from the SRV records and the addresses known for their targets; and the
/// targets whose address is not known yet (to be asked for). A target of "." (RFC 2782: the
/// service is not offered there) and a port of 0 are left out.
pub fn srv_addresses(srv: &[Srv], addrs: &[(String, IpAddr, u32)]) -> (Vec<String>, Vec<String>) {
    let mut by_name: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    for (n, ip, _) in addrs {
        by_name.entry(n.as_str()).or_default().push(*ip);
    }
    let mut ordered: Vec<&Srv> = srv.iter().filter(|s| !s.target.is_empty() && s.port != 0).collect();
    ordered.sort_by(|a, b| a.priority.cmp(&b.priority).then(b.weight.cmp(&a.weight)).then(a.target.cmp(&b.target)));
    let (mut found, mut missing) = (Vec::new(), Vec::new());
    for s in ordered {
        match by_name.get(s.target.as_str()) {
            Some(ips) => {
                for ip in ips {
                    let a = std::net::SocketAddr::new(*ip, s.port).to_string();
                    if !found.contains(&a) {
                        found.push(a);
                    }
                }
            }
            None if !missing.contains(&s.target) => missing.push(s.target.clone()),
            None => {}
        }
    }
    (found, missing)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DnsError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len()).ok_or(DnsError::Malformed("short"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, DnsError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DnsError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    /// A possibly compressed name, lower case, without the final dot ("" for the root). The
    /// reader moves past the name's bytes at its position (a pointer ends it).
    fn name(&mut self) -> Result<String, DnsError> {
        let mut out = String::new();
        let mut pos = self.at;
        let mut pointers = 0;
        let mut resume = None;
        loop {
            let len = *self.b.get(pos).ok_or(DnsError::Malformed("name runs past the end"))?;
            match len {
                0 => {
                    pos += 1;
                    break;
                }
                l if l & 0xc0 == 0xc0 => {
                    let low = *self.b.get(pos + 1).ok_or(DnsError::Malformed("pointer runs past the end"))?;
                    pointers += 1;
                    if pointers > MAX_POINTERS {
                        return Err(DnsError::Malformed("compressed name loops"));
                    }
                    resume.get_or_insert(pos + 2);
                    pos = (usize::from(l & 0x3f) << 8) | usize::from(low);
                }
                l if l & 0xc0 != 0 => return Err(DnsError::Malformed("unknown label type")),
                l => {
                    let label = self
                        .b
                        .get(pos + 1..pos + 1 + usize::from(l))
                        .ok_or(DnsError::Malformed("label runs past the end"))?;
                    if out.len() + label.len() + 1 > 255 {
                        return Err(DnsError::Malformed("name longer than 255 bytes"));
                    }
                    if !out.is_empty() {
                        out.push('.');
                    }
                    // Names in answers are compared with names of our own, which are ASCII: any
                    // other byte becomes '?' and so matches nothing.
                    out.extend(
                        label.iter().map(|b| if b.is_ascii_graphic() { b.to_ascii_lowercase() as char } else { '?' }),
                    );
                    pos += 1 + usize::from(l);
                }
            }
        }
        self.at = resume.unwrap_or(pos);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "_clusteros._tcp.site.test";

    /// An answer as a server writes it: the question, then the given records (owner names
    /// compressed to the question's name at offset 12 when they equal it).
    fn answer(id: u16, flags: u16, qtype: u16, records: &[(&str, u16, Vec<u8>)], extra: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&((records.len() - extra) as u16).to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&(extra as u16).to_be_bytes());
        encode_name(&mut b, NAME);
        b.extend_from_slice(&qtype.to_be_bytes());
        b.extend_from_slice(&CLASS_IN.to_be_bytes());
        for (owner, rtype, data) in records {
            if *owner == NAME {
                b.extend_from_slice(&[0xc0, 12]);
            } else {
                encode_name(&mut b, owner);
            }
            b.extend_from_slice(&rtype.to_be_bytes());
            b.extend_from_slice(&CLASS_IN.to_be_bytes());
            b.extend_from_slice(&300u32.to_be_bytes());
            b.extend_from_slice(&(data.len() as u16).to_be_bytes());
            b.extend_from_slice(data);
        }
        b
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> Vec<u8> {
        let mut d = Vec::new();
        for v in [priority, weight, port] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        encode_name(&mut d, target);
        d
    }

    #[test]
    fn a_query_is_a_standard_recursive_question() {
        let q = encode_query(0xbeef, "_clusteros._tcp.Site.Test.", TYPE_SRV);
        let mut want = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(b"\x0a_clusteros\x04_tcp\x04site\x04test\x00\x00\x21\x00\x01");
        assert_eq!(q, want);
    }

    #[test]
    fn srv_records_and_additional_addresses_become_addresses_in_srv_order() {
        let recs = vec![
            (NAME, TYPE_SRV, srv(20, 0, 7600, "c.site.test")),
            (NAME, TYPE_SRV, srv(10, 5, 7600, "b.site.test")),
            (NAME, TYPE_SRV, srv(10, 50, 7601, "a.site.test")),
            (NAME, TYPE_SRV, srv(10, 0, 7600, ".")),
            ("a.site.test", TYPE_A, vec![10, 0, 0, 1]),
            ("b.site.test", TYPE_AAAA, "fd00::2".parse::<Ipv6Addr>().unwrap().octets().to_vec()),
        ];
        let a = parse_answer(&answer(7, 0x8180, TYPE_SRV, &recs, 2), 7, NAME, TYPE_SRV).unwrap();
        assert_eq!(a.srv.len(), 4);
        assert_eq!(a.srv[0], Srv { priority: 20, weight: 0, port: 7600, target: "c.site.test".into(), ttl: 300 });
        let (found, missing) = srv_addresses(&a.srv, &a.addrs);
        assert_eq!(found, ["10.0.0.1:7601", "[fd00::2]:7600"], "priority, then weight; '.' left out");
        assert_eq!(missing, ["c.site.test"], "no address known yet");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let ok = answer(7, 0x8180, TYPE_SRV, &[(NAME, TYPE_SRV, srv(0, 0, 7600, "a.site.test"))], 0);
        assert_eq!(parse_answer(&ok, 8, NAME, TYPE_SRV), Err(DnsError::Mismatch), "another id");
        assert_eq!(parse_answer(&ok, 7, "_other._tcp.site.test", TYPE_SRV), Err(DnsError::Mismatch));
        assert_eq!(parse_answer(&ok, 7, NAME, TYPE_A), Err(DnsError::Mismatch), "another type");
        let nx = answer(7, 0x8183, TYPE_SRV, &[], 0);
        assert_eq!(parse_answer(&nx, 7, NAME, TYPE_SRV), Err(DnsError::NoSuchName(NAME.into())));
        let fail = answer(7, 0x8182, TYPE_SRV, &[], 0);
        assert!(parse_answer(&fail, 7, NAME, TYPE_SRV).unwrap_err().to_string().contains("server failure"));
        let tc = answer(7, 0x8380, TYPE_SRV, &[], 0);
        assert_eq!(parse_answer(&tc, 7, NAME, TYPE_SRV), Err(DnsError::Truncated));
        let query = encode_query(7, NAME, TYPE_SRV);
        assert_eq!(parse_answer(&query, 7, NAME, TYPE_SRV), Err(DnsError::Mismatch), "a query is no answer");
        // Every cut of a good answer is refused or parsed, never a panic.
        for n in 0..ok.len() {
            assert!(parse_answer(&ok[..n], 7, NAME, TYPE_SRV).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn compressed_names_that_loop_or_overrun_are_refused() {
        let mut looped = answer(7, 0x8180, TYPE_SRV, &[], 0);
        // The question's name becomes a pointer to itself.
        looped.truncate(12);
        looped.extend_from_slice(&[0xc0, 12, 0, 33, 0, 1]);
        assert_eq!(parse_answer(&looped, 7, NAME, TYPE_SRV), Err(DnsError::Malformed("compressed name loops")));
        let mut far = looped.clone();
        far[13] = 0xff;
        assert!(matches!(parse_answer(&far, 7, NAME, TYPE_SRV), Err(DnsError::Malformed(_))));
        let mut label_type = looped;
        label_type[12] = 0x80;
        assert_eq!(parse_answer(&label_type, 7, NAME, TYPE_SRV), Err(DnsError::Malformed("unknown label type")));
    }

    #[test]
    fn records_are_bounded() {
        let recs: Vec<_> = (0..100).map(|i| (NAME, TYPE_SRV, srv(0, 0, 7600, &format!("n{i}.site.test")))).collect();
        let bytes = answer(7, 0x8180, TYPE_SRV, &recs, 0);
        assert_eq!(parse_answer(&bytes, 7, NAME, TYPE_SRV).unwrap().srv.len(), MAX_RECORDS);
    }

    #[test]
    fn config_names_are_checked() {
        assert!(check_name(NAME).is_ok());
        assert!(check_name("_clusteros._tcp.site.test.").is_ok());
        for bad in ["", "a..b", "a b.test", &"x".repeat(64), &format!("{}.test", "a.".repeat(130))] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
