//! `NetPolicy::client_ip` + `check` on an arbitrary TCP peer and arbitrary
//! `X-Forwarded-For` header lines.
//!
//! Input: `\n`-separated; the first line is the peer (an address literal;
//! otherwise its first byte picks one from `PEERS`), every further line is one
//! `X-Forwarded-For` header value (lines that are not valid header values are
//! dropped, as hyper would never produce them).
//!
//! Invariants: never panics; an untrusted peer is the client, whatever the
//! header says; the result is a trusted proxy only if every hop was a trusted
//! proxy; `Ok` only with an address literally present in the input (a hop,
//! with an optional port) or the peer; and the result equals an independent
//! oracle walk (rightmost hop that is not a trusted proxy, malformed hop on
//! the walk = `BadForwarded`). `check` agrees with the allow list.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use ocrolus_relay::{NetPolicy, NetReject};

const POLICY: &str = "\
allow:
  - 203.0.113.7/32
  - 2001:db8::/32
  - ::ffff:198.51.100.0/120
trusted_proxies:
  - 10.0.0.0/8
  - 192.168.0.0/16
  - fd00::/8
  - ::ffff:172.16.0.0/108
  - ::1
";

const PEERS: [&str; 10] = [
    "10.0.0.1",
    "10.255.255.255",
    "192.168.1.1",
    "172.16.5.4",
    "::ffff:10.1.2.3",
    "::ffff:172.31.0.1",
    "fd00::1",
    "::1",
    "203.0.113.7",
    "198.51.100.1",
];

/// Independent hop parser: the hop, trimmed of spaces and tabs, is an address
/// literal, `v4:port` or `[v6]:port`. Canonical (IPv4-mapped folded to IPv4).
fn oracle_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim_matches(|c| c == ' ' || c == '\t');
    if hop.is_empty() || hop.len() > 64 {
        return None;
    }
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let close = rest.find(']')?;
        let port = rest[close + 1..].strip_prefix(':')?;
        port.parse::<u16>().ok()?;
        return Some(IpAddr::V6(rest[..close].parse::<Ipv6Addr>().ok()?).to_canonical());
    }
    let colon = hop.rfind(':')?;
    hop[colon + 1..].parse::<u16>().ok()?;
    hop[..colon].parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

fn trusted(policy: &NetPolicy, ip: IpAddr) -> bool {
    policy.trusted_proxies().iter().any(|n| n.contains(&ip))
}

/// Parsed once: YAML parsing per input would dominate the run time.
static POLICY_PARSED: LazyLock<NetPolicy> =
    LazyLock::new(|| NetPolicy::parse(POLICY).expect("fixed policy parses"));

fuzz_target!(|data: &[u8]| {
    let policy: &NetPolicy = &POLICY_PARSED;
    let mut lines = data.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let peer: IpAddr = match std::str::from_utf8(first).ok().and_then(|s| s.parse().ok()) {
        Some(ip) => ip,
        None => {
            let pick = first.first().copied().unwrap_or(0) as usize % PEERS.len();
            PEERS[pick].parse().expect("peer table")
        }
    };
    let mut headers = HeaderMap::new();
    let mut values: Vec<String> = Vec::new();
    for line in lines {
        let Ok(value) = HeaderValue::from_bytes(line) else {
            continue;
        };
        if let Ok(s) = value.to_str() {
            values.push(s.to_owned());
        } else {
            // Not visible ASCII: the relay must refuse it when it walks it.
            values.push(String::from("\u{0}not-ascii"));
        }
        headers.append("x-forwarded-for", value);
    }

    let got = policy.client_ip(peer, &headers);
    let peer_c = peer.to_canonical();

    // Oracle walk, right to left over every line and every hop.
    let expected: Result<IpAddr, NetReject> = (|| {
        let mut current = peer_c;
        if !trusted(policy, current) {
            return Ok(current);
        }
        for line in values.iter().rev() {
            for hop in line.rsplit(',') {
                current = oracle_hop(hop).ok_or(NetReject::BadForwarded)?;
                if !trusted(policy, current) {
                    return Ok(current);
                }
            }
        }
        Ok(current)
    })();
    assert_eq!(
        got.map(|c| c.addr()),
        expected,
        "client_ip disagrees with the oracle (peer {peer}, XFF {values:?})"
    );

    if !trusted(policy, peer_c) {
        assert_eq!(
            got.map(|c| c.addr()),
            Ok(peer_c),
            "untrusted peer must be the client"
        );
    }
    if let Ok(client) = got {
        let ip = client.addr();
        // Present in the input: the peer, or one hop of one line.
        let present = ip == peer_c
            || values
                .iter()
                .flat_map(|l| l.split(','))
                .any(|hop| oracle_hop(hop) == Some(ip));
        assert!(present, "client {ip} appears nowhere in the input");
        if trusted(policy, ip) {
            let all_trusted = trusted(policy, peer_c)
                && values
                    .iter()
                    .flat_map(|l| l.split(','))
                    .all(|hop| oracle_hop(hop).is_some_and(|h| trusted(policy, h)));
            assert!(
                all_trusted,
                "client {ip} is a trusted proxy but not every hop was"
            );
        }
        let allowed = policy.allowed().iter().any(|n| n.contains(&ip));
        assert_eq!(
            policy.check(client).is_ok(),
            allowed,
            "check disagrees with the allow list"
        );
    }
});
