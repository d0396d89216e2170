//! Optional PROXY protocol (v1 text or v2 binary) on the public listener,
//! for deployments behind a TCP load balancer: the header names the real
//! client. It is read byte-exactly (nothing of the TLS or HTTP stream after
//! it is consumed) and parsed by the `ppp` crate. With `--proxy-protocol`, a
//! connection without a valid header is closed: fail closed.

use std::net::IpAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

const V1_MAX: usize = 107;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Generous for TLVs, small enough that a header cannot cost much memory.
const V2_MAX_PAYLOAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header")]
    Malformed,
    #[error("PROXY protocol header too long")]
    TooLong,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one header. `Ok(None)`: a LOCAL/UNKNOWN header (health checks),
/// meaning the TCP peer itself is the client.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<IpAddr>, ProxyHeaderError> {
    let mut buf = vec![0u8; 5];
    stream.read_exact(&mut buf).await?;
    if &buf[..] == b"PROXY" {
        loop {
            if buf.len() >= V1_MAX {
                return Err(ProxyHeaderError::TooLong);
            }
            let byte = stream.read_u8().await?;
            buf.push(byte);
            if buf.ends_with(b"\r\n") {
                return parse(&buf);
            }
        }
    }
    if buf[..] != V2_SIGNATURE[..5] {
        return Err(ProxyHeaderError::Missing);
    }
    buf.resize(16, 0);
    stream.read_exact(&mut buf[5..]).await?;
    if buf[..12] != V2_SIGNATURE[..] {
        return Err(ProxyHeaderError::Missing);
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX_PAYLOAD {
        return Err(ProxyHeaderError::TooLong);
    }
    buf.resize(16 + len, 0);
    stream.read_exact(&mut buf[16..]).await?;
    parse(&buf)
}

/// Parses one complete header.
pub fn parse(bytes: &[u8]) -> Result<Option<IpAddr>, ProxyHeaderError> {
    match ppp::HeaderResult::parse(bytes) {
        ppp::HeaderResult::V1(Ok(header)) => Ok(match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some(IpAddr::V4(a.source_address)),
            ppp::v1::Addresses::Tcp6(a) => Some(IpAddr::V6(a.source_address)),
            ppp::v1::Addresses::Unknown => None,
        }),
        ppp::HeaderResult::V2(Ok(header)) => {
            if header.len() != bytes.len() {
                return Err(ProxyHeaderError::Malformed);
            }
            Ok(match (header.command, header.addresses) {
                (ppp::v2::Command::Local, _) => None,
                (_, ppp::v2::Addresses::IPv4(a)) => Some(IpAddr::V4(a.source_address)),
                (_, ppp::v2::Addresses::IPv6(a)) => Some(IpAddr::V6(a.source_address)),
                (_, _) => None,
            })
        }
        _ => Err(ProxyHeaderError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<IpAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut cursor = std::io::Cursor::new(bytes.to_vec());
        let result = read_header(&mut cursor).await;
        let mut rest = Vec::new();
        let _ = cursor.read_to_end(&mut rest).await;
        (result, rest)
    }

    #[tokio::test]
    async fn v1_tcp4_leaves_the_stream_intact() {
        let (ip, rest) =
            read(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(ip.expect("ok"), Some("203.0.113.7".parse().expect("ip")));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn v1_unknown_means_the_peer() {
        let (ip, _) = read(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(ip.expect("ok"), None);
    }

    #[tokio::test]
    async fn v2_tcp6() {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend([0x21, 0x21, 0, 36]); // v2 PROXY, TCP over IPv6, 36 bytes
        let src: std::net::Ipv6Addr = "2001:db8::7".parse().expect("ip");
        header.extend(src.octets());
        header.extend([0u8; 16]);
        header.extend([0xc7, 0x38, 0x01, 0xbb]);
        header.extend(b"\x16\x03\x01");
        let (ip, rest) = read(&header).await;
        assert_eq!(ip.expect("ok"), Some(IpAddr::V6(src)));
        assert_eq!(rest, b"\x16\x03\x01");
    }

    #[tokio::test]
    async fn missing_or_garbage_header_is_refused() {
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\n").await.0,
            Err(ProxyHeaderError::Missing)
        ));
        assert!(matches!(
            read(b"PROXY TCP4 nonsense\r\n").await.0,
            Err(ProxyHeaderError::Malformed)
        ));
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(
            read(&long).await.0,
            Err(ProxyHeaderError::TooLong)
        ));
    }
}
