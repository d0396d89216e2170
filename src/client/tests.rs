use super::*;
use http::HeaderValue;

fn policy() -> NetPolicy {
    NetPolicy::parse(
        "allow:\n  - 203.0.113.7/32 # ocrolus\n  - 2001:db8::/32\ntrusted_proxies:\n  - 10.0.0.0/8\n",
    )
    .expect("valid policy")
}

fn xff(values: &[&str]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for v in values {
        headers.append("x-forwarded-for", HeaderValue::from_str(v).expect("header"));
    }
    headers
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn untrusted_peer_ignores_forwarded_header() {
    let p = policy();
    let got = p
        .client_ip(ip("198.51.100.1"), &xff(&["203.0.113.7"]))
        .expect("ok");
    assert_eq!(got.addr(), ip("198.51.100.1"));
    assert_eq!(p.check(got), Err(NetReject::NotAllowed));
}

#[test]
fn trusted_peer_takes_rightmost_untrusted_hop() {
    let p = policy();
    // A client spoofs the leftmost entry; the proxy appends the real address.
    let got = p
        .client_ip(ip("10.1.1.1"), &xff(&["203.0.113.7, 198.51.100.9"]))
        .expect("ok");
    assert_eq!(got.addr(), ip("198.51.100.9"));
}

#[test]
fn chain_of_trusted_proxies_is_skipped() {
    let p = policy();
    let got = p
        .client_ip(ip("10.1.1.1"), &xff(&["1.1.1.1, 203.0.113.7", "10.2.2.2"]))
        .expect("ok");
    assert_eq!(got.addr(), ip("203.0.113.7"));
    assert!(p.check(got).is_ok());
}

#[test]
fn malformed_hop_fails_closed() {
    let p = policy();
    assert_eq!(
        p.client_ip(ip("10.1.1.1"), &xff(&["203.0.113.7, unknown"])),
        Err(NetReject::BadForwarded)
    );
}

#[test]
fn only_trusted_hops_yield_leftmost() {
    let p = policy();
    let got = p
        .client_ip(ip("10.1.1.1"), &xff(&["10.3.3.3"]))
        .expect("ok");
    assert_eq!(got.addr(), ip("10.3.3.3"));
}

#[test]
fn mapped_ipv6_peer_is_folded() {
    let p = policy();
    let got = p
        .client_ip(ip("::ffff:203.0.113.7"), &HeaderMap::new())
        .expect("ok");
    assert_eq!(got.addr(), ip("203.0.113.7"));
    assert!(p.check(got).is_ok());
}

#[test]
fn hops_with_ports_parse() {
    assert_eq!(parse_hop("1.2.3.4:80"), Some(ip("1.2.3.4")));
    assert_eq!(parse_hop("[2001:db8::1]:443"), Some(ip("2001:db8::1")));
    assert_eq!(parse_hop(" 2001:db8::1 "), Some(ip("2001:db8::1")));
    assert_eq!(parse_hop("1.2.3.4:99999"), None);
    assert_eq!(parse_hop("_hidden"), None);
    assert_eq!(parse_hop(""), None);
}

#[test]
fn bad_cidr_names_its_line() {
    let err = NetPolicy::parse("allow:\n  - 1.2.3.4/32\n  - 300.1.1.1/8\n").expect_err("bad");
    assert!(err.to_string().contains("line 3"), "{err}");
    assert!(err.to_string().contains("300.1.1.1/8"), "{err}");
}

#[test]
fn empty_allow_is_refused() {
    assert!(NetPolicy::parse("allow: []\n").is_err());
}

#[test]
fn unknown_key_is_refused() {
    assert!(NetPolicy::parse("allow: [1.2.3.4]\ntrusted_proxy: []\n").is_err());
}

#[test]
fn mapped_ipv6_allow_entry_matches_ipv4_client() {
    let p = NetPolicy::parse("allow: ['::ffff:203.0.113.0/120']\n").expect("ok");
    assert!(p.check(ClientIp::new(ip("203.0.113.9"))).is_ok());
}

#[test]
fn shipped_allowlist_has_the_seven_ocrolus_addresses() {
    let text = include_str!("../../allowlist.yaml");
    let p = NetPolicy::parse(text).expect("shipped allowlist parses");
    let expected = [
        "18.205.30.63",
        "18.208.79.114",
        "18.213.224.210",
        "18.233.250.22",
        "35.173.140.133",
        "35.174.183.80",
        "54.164.238.206",
    ];
    assert_eq!(p.allowed().len(), expected.len());
    for addr in expected {
        assert!(p.check(ClientIp::new(ip(addr))).is_ok(), "{addr}");
    }
    assert!(p.trusted_proxies().is_empty());
}

#[test]
fn cidr_with_host_bits_is_refused_with_both_corrections() {
    let err = NetPolicy::parse("allow:\n  - 10.0.0.1/8\n").expect_err("host bits");
    assert_eq!(
        err.to_string(),
        "line 2: `allow` entry \"10.0.0.1/8\" has host bits set; write 10.0.0.0/8 for the whole \
         range or 10.0.0.1/32 for the one address"
    );
    let err = NetPolicy::parse("allow: [10.0.0.0/8]\ntrusted_proxies:\n  - 2001:db8::1/64\n")
        .expect_err("host bits");
    assert!(
        err.to_string()
            .contains("write 2001:db8::/64 for the whole range or 2001:db8::1/128"),
        "{err}"
    );
}
