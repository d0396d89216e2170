//! Pipeline steps 2 and 3: who is the client, and may it deliver?
//!
//! Defends against address spoofing: `X-Forwarded-For` is believed only when
//! the TCP peer is a trusted proxy, and then only the hops appended by trusted
//! proxies are skipped. A malformed hop ends the walk and fails closed.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use http::HeaderMap;
use ipnet::IpNet;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::config_error::ConfigError;

/// A client address, IPv4-mapped IPv6 already folded to IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientIp(IpAddr);

impl ClientIp {
    pub fn new(ip: IpAddr) -> Self {
        Self(ip.to_canonical())
    }

    pub fn addr(self) -> IpAddr {
        self.0
    }
}

impl fmt::Display for ClientIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a request has no trustworthy client address, or may not deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetReject {
    #[error("X-Forwarded-For from a trusted proxy is malformed")]
    BadForwarded,
    #[error("client address is not allowlisted")]
    NotAllowed,
}

/// `allowlist.yaml`, as written by the operator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowlistFile {
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
}

/// The network policy: which clients may deliver, whose forwarding headers
/// are believed.
#[derive(Debug, Clone)]
pub struct NetPolicy {
    allow: Vec<IpNet>,
    trusted_proxies: Vec<IpNet>,
}

impl NetPolicy {
    pub fn new(allow: Vec<IpNet>, trusted_proxies: Vec<IpNet>) -> Result<Self, ConfigError> {
        if allow.is_empty() {
            return Err(ConfigError::new(
                "allowlist: `allow` is empty; the relay refuses to accept from nobody-in-particular (fail closed)",
            ));
        }
        Ok(Self {
            allow: allow.into_iter().map(canonical_net).collect(),
            trusted_proxies: trusted_proxies.into_iter().map(canonical_net).collect(),
        })
    }

    /// The `--dev` policy: loopback clients only.
    pub fn loopback_only() -> Self {
        let allow = ["127.0.0.0/8", "::1/128"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        Self {
            allow,
            trusted_proxies: Vec::new(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(format!("allowlist {}: {e}", path.display())))?;
        Self::parse(&text)
            .map_err(|e| ConfigError::new(format!("allowlist {}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let file: AllowlistFile = serde_saphyr::from_str(text)
            .map_err(|e| ConfigError::new(format!("invalid YAML: {e}")))?;
        let allow = parse_nets("allow", &file.allow)?;
        let trusted = parse_nets("trusted_proxies", &file.trusted_proxies)?;
        Self::new(allow, trusted)
    }

    pub fn allowed(&self) -> &[IpNet] {
        &self.allow
    }

    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.trusted_proxies
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// Step 2: the TCP peer, unless it is a trusted proxy; then the rightmost
    /// `X-Forwarded-For` hop that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> Result<ClientIp, NetReject> {
        let mut current = peer.to_canonical();
        if !self.is_trusted_proxy(current) {
            return Ok(ClientIp(current));
        }
        // Hops, right to left, across every X-Forwarded-For header line.
        let lines: Vec<&http::HeaderValue> = headers.get_all("x-forwarded-for").iter().collect();
        for line in lines.into_iter().rev() {
            let line = line.to_str().map_err(|_| NetReject::BadForwarded)?;
            for hop in line.rsplit(',') {
                let ip = parse_hop(hop).ok_or(NetReject::BadForwarded)?;
                current = ip;
                if !self.is_trusted_proxy(current) {
                    return Ok(ClientIp(current));
                }
            }
        }
        // Every hop was a trusted proxy: the leftmost one is the client.
        Ok(ClientIp(current))
    }

    /// Step 3.
    pub fn check(&self, ip: ClientIp) -> Result<(), NetReject> {
        if self.allow.iter().any(|net| net.contains(&ip.0)) {
            Ok(())
        } else {
            Err(NetReject::NotAllowed)
        }
    }
}

fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
            Some(v4) if v6.prefix_len() >= 96 => {
                IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net)
            }
            _ => net,
        },
        IpNet::V4(_) => net,
    }
}

fn parse_nets(field: &str, entries: &[Spanned<String>]) -> Result<Vec<IpNet>, ConfigError> {
    entries
        .iter()
        .map(|entry| {
            let line = entry.referenced.line();
            let net = parse_net(entry.value.trim()).ok_or_else(|| {
                ConfigError::new(format!(
                    "line {line}: `{field}` entry {:?} is not an IP address or CIDR",
                    entry.value
                ))
            })?;
            // `10.0.0.1/8` means 10.0.0.0/8 to the parser; whoever wrote it
            // most likely meant one host (/32) or mistyped the prefix. Refuse
            // rather than silently open (or close) a whole range.
            if net.addr() != net.network() {
                return Err(ConfigError::new(format!(
                    "line {line}: `{field}` entry {:?} has host bits set; write {} for the \
                     whole range or {} for the one address",
                    entry.value,
                    net.trunc(),
                    IpNet::from(net.addr())
                )));
            }
            Ok(net)
        })
        .collect()
}

/// A CIDR, or a bare address meaning a single host.
pub fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net);
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// One `X-Forwarded-For` hop: an address, optionally with a port
/// (`1.2.3.4:80`, `[::1]:80`). Anything else (`unknown`, obfuscated
/// identifiers, garbage) is rejected.
pub fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if hop.is_empty() || hop.len() > 64 {
        return None;
    }
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let (ip, port) = rest.split_once(']')?;
        let port = port.strip_prefix(':')?;
        port.parse::<u16>().ok()?;
        return ip
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|v6| IpAddr::V6(v6).to_canonical());
    }
    let (ip, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests;
