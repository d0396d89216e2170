//! The broker's addresses (the nodes of a RabbitMQ cluster, or one node) and
//! the TLS settings used to reach them; shared by `serve`, `tail` and
//! `spool replay`.
//!
//! Every address is parsed and every TLS file read and checked once, at
//! start: a CA file without a certificate, a client certificate without its
//! key or a key that does not match is a start-up error, not a connect
//! failure found later. What only the broker can judge (our certificate, its
//! certificate, our credentials) is a [`ConnectFailure::Rejected`] at connect
//! time, which `/readyz` reports.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties, ErrorKind};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::BrokerArgs;
use crate::config_error::ConfigError;
use crate::metrics::ConnectFailureReason;

/// Heartbeat asked for when the URL names none: a dead peer is noticed in
/// seconds, not the broker's default minute.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// One broker address.
struct Node {
    uri: AMQPUri,
    /// `host:port`, without credentials: for logs, metrics and `/readyz`.
    label: String,
}

/// PEM material for `amqps://`. No `Debug`: it holds a private key.
struct BrokerTls {
    /// Extra trusted CA certificates (on top of the system's).
    ca_pem: Option<String>,
    /// Client certificate chain and key, for mutual TLS.
    identity: Option<OwnedIdentity>,
}

/// The broker's addresses, in the order given, with their TLS settings.
#[derive(Clone)]
pub struct Nodes {
    nodes: Arc<[Node]>,
    tls: Arc<BrokerTls>,
}

impl fmt::Debug for Nodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nodes")
            .field("nodes", &self.labels().collect::<Vec<_>>())
            .field("ca_file", &self.tls.ca_pem.is_some())
            .field("client_cert", &self.tls.identity.is_some())
            .finish()
    }
}

/// Why a connect attempt failed. Each is a metric reason.
#[derive(Debug)]
pub enum ConnectFailure {
    /// Nothing answered, or the connection broke before AMQP was open.
    Unreachable(String),
    /// The node answered and refused us: TLS (its certificate is not
    /// trusted, or it wants a client certificate we do not have or it does
    /// not trust) or credentials. Retrying does not help; an operator must.
    Rejected(String),
    /// Connected, but opening channels failed.
    Setup(String),
    /// An exchange the relay publishes to is missing (with `--no-declare`)
    /// or could not be declared as the relay needs it. Events would be
    /// lost to it, so the link is not used; `/readyz` reports which one.
    Topology(String),
}

impl ConnectFailure {
    pub fn reason(&self) -> ConnectFailureReason {
        match self {
            Self::Unreachable(_) => ConnectFailureReason::Unreachable,
            Self::Rejected(_) => ConnectFailureReason::Rejected,
            Self::Setup(_) | Self::Topology(_) => ConnectFailureReason::Setup,
        }
    }
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable(e) => write!(f, "unreachable: {e}"),
            Self::Rejected(e) => write!(f, "rejected (TLS or credentials): {e}"),
            Self::Setup(e) => write!(f, "setup failed: {e}"),
            Self::Topology(e) => write!(f, "topology: {e}"),
        }
    }
}

impl Nodes {
    /// Parses `--amqp-url` (each, in order) and reads the TLS files.
    pub fn from_args(args: &BrokerArgs) -> Result<Self, ConfigError> {
        if args.amqp_url.is_empty() {
            return Err(ConfigError::new(
                "--amqp-url: at least one address is needed",
            ));
        }
        let mut nodes = Vec::with_capacity(args.amqp_url.len());
        for url in &args.amqp_url {
            let mut uri: AMQPUri = url.trim().parse().map_err(|e| {
                ConfigError::new(format!(
                    "--amqp-url {}: {e}",
                    crate::config::redact_url(url)
                ))
            })?;
            if uri.query.heartbeat.is_none() {
                uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
            }
            let label = format!("{}:{}", uri.authority.host, uri.authority.port);
            nodes.push(Node { uri, label });
        }
        let any_tls = nodes.iter().any(|n| n.uri.scheme == AMQPScheme::AMQPS);
        let tls = BrokerTls::load(args)?;
        if !any_tls && (tls.ca_pem.is_some() || tls.identity.is_some()) {
            return Err(ConfigError::new(
                "--amqp-ca-file / --amqp-client-cert are given but no --amqp-url is amqps://",
            ));
        }
        Ok(Self {
            nodes: nodes.into(),
            tls: Arc::new(tls),
        })
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `host:port` of node `index` (modulo the count).
    pub fn label(&self, index: usize) -> &str {
        &self.nodes[index % self.nodes.len()].label
    }

    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|n| n.label.as_str())
    }

    /// Opens an AMQP connection to node `index` (modulo the count).
    pub async fn connect(
        &self,
        index: usize,
        properties: ConnectionProperties,
    ) -> Result<Connection, ConnectFailure> {
        let node = &self.nodes[index % self.nodes.len()];
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| ConnectFailure::Unreachable(e.to_string()))?;
        Connection::connect_uri_with_config(node.uri.clone(), properties, self.tls.owned(), runtime)
            .await
            .map_err(classify)
    }

    /// Tries the nodes in order and returns the first connection that opens
    /// (`tail`, one-shot tools), or every node's failure.
    pub async fn connect_first(
        &self,
        properties: ConnectionProperties,
    ) -> anyhow::Result<(Connection, &str)> {
        let mut failures = Vec::new();
        let mut all_unreachable = true;
        for index in 0..self.nodes.len() {
            match self.connect(index, properties.clone()).await {
                Ok(connection) => return Ok((connection, self.label(index))),
                Err(e) => {
                    all_unreachable &= matches!(e, ConnectFailure::Unreachable(_));
                    failures.push(format!("{}: {e}", self.label(index)));
                }
            }
        }
        // A refusal already says what to check; an outage gets it here.
        let hint = if all_unreachable {
            "; check that RabbitMQ runs there and that --amqp-url (RELAY_AMQP_URL) names it"
        } else {
            ""
        };
        anyhow::bail!("no broker node answered: {}{hint}", failures.join("; "))
    }
}

impl BrokerTls {
    fn load(args: &BrokerArgs) -> Result<Self, ConfigError> {
        let ca_pem = args
            .amqp_ca_file
            .as_deref()
            .map(|path| {
                let pem = read_pem(path, "--amqp-ca-file")?;
                let certs = certificates(&pem, path, "--amqp-ca-file")?;
                let mut roots = rustls::RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(ConfigError::new(format!(
                        "--amqp-ca-file {}: no usable CA certificate",
                        path.display()
                    )));
                }
                String::from_utf8(pem).map_err(|_| {
                    ConfigError::new(format!("--amqp-ca-file {}: not PEM text", path.display()))
                })
            })
            .transpose()?;
        let identity = match (&args.amqp_client_cert, &args.amqp_client_key) {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::new(
                    "--amqp-client-cert and --amqp-client-key go together",
                ));
            }
            (Some(cert_path), Some(key_path)) => {
                let pem = read_pem(cert_path, "--amqp-client-cert")?;
                let key = read_pem(key_path, "--amqp-client-key")?;
                check_identity(&pem, cert_path, &key, key_path)?;
                Some(OwnedIdentity::PKCS8 { pem, key })
            }
        };
        Ok(Self { ca_pem, identity })
    }

    fn owned(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: self.identity.clone(),
            cert_chain: self.ca_pem.clone(),
        }
    }
}

fn read_pem(path: &Path, flag: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::new(format!("{flag} {}: {e}", path.display())))
}

fn certificates(
    pem: &[u8],
    path: &Path,
    flag: &str,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ConfigError::new(format!(
            "{flag} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// The client certificate parses, the key parses and the two belong together
/// (rustls checks that when it builds a client configuration).
fn check_identity(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
) -> Result<(), ConfigError> {
    let certs = certificates(cert_pem, cert_path, "--amqp-client-cert")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        ConfigError::new(format!(
            "--amqp-client-key {}: no usable private key: {e}",
            key_path.display()
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(format!("TLS: {e}")))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(certs, key)
        .map_err(|e| {
            ConfigError::new(format!(
                "--amqp-client-cert {} / --amqp-client-key {}: {e}",
                cert_path.display(),
                key_path.display()
            ))
        })?;
    Ok(())
}

/// Sorts a lapin connect error: the broker refusing us (TLS, credentials)
/// is an operator's problem; anything else is an outage to wait out.
/// A refusal says what the broker said and what to change.
fn classify(e: lapin::Error) -> ConnectFailure {
    let text = e.to_string();
    match e.kind() {
        ErrorKind::ProtocolError(amqp) if amqp.get_id() == 403 => {
            ConnectFailure::Rejected(format!(
                "{}; check the user and password in --amqp-url (RELAY_AMQP_URL), and that the user \
             may connect from this host (RabbitMQ's guest only from localhost)",
                amqp.get_message()
            ))
        }
        ErrorKind::ProtocolError(amqp) if amqp.get_id() == 530 => {
            ConnectFailure::Rejected(format!(
                "{}; check the virtual host in --amqp-url (the path: %2f for /) and the user's \
             permissions on it",
                amqp.get_message()
            ))
        }
        ErrorKind::AuthProviderError(_) => ConnectFailure::Rejected(text),
        ErrorKind::IOError(io) if is_tls(io) => ConnectFailure::Rejected(format!(
            "{text}; check that --amqp-ca-file signs the broker's certificate and that the \
             broker trusts --amqp-client-cert"
        )),
        _ => ConnectFailure::Unreachable(text),
    }
}

fn is_tls(io: &std::io::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = io
        .get_ref()
        .map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(e) = source {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        broker: BrokerArgs,
    }

    fn args(argv: &[&str]) -> BrokerArgs {
        let mut full = vec!["relay"];
        full.extend_from_slice(argv);
        Flags::try_parse_from(full).expect("flags parse").broker
    }

    #[test]
    fn urls_repeat_or_come_comma_separated_in_order() {
        let nodes = Nodes::from_args(&args(&[
            "--amqp-url",
            "amqp://u:p@10.0.0.1:5672/%2f",
            "--amqp-url",
            "amqp://u:p@10.0.0.2:5673/%2f,amqp://u:p@rabbit-3:5674/%2f",
        ]))
        .expect("valid");
        assert_eq!(
            nodes.labels().collect::<Vec<_>>(),
            ["10.0.0.1:5672", "10.0.0.2:5673", "rabbit-3:5674"]
        );
        assert_eq!(nodes.label(4), "10.0.0.2:5673");
        assert!(
            !format!("{nodes:?}").contains("u:p"),
            "no credentials in Debug"
        );
    }

    #[test]
    fn a_bad_url_names_the_flag_without_the_password() {
        let e = Nodes::from_args(&args(&["--amqp-url", "amqp://u:secret@h:5672/%2f,ftp://x"]))
            .expect_err("ftp is no AMQP URL");
        assert!(e.to_string().contains("--amqp-url"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn tls_files_are_checked_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let e = Nodes::from_args(&args(&[
            "--amqp-url",
            "amqps://h:5671/%2f",
            "--amqp-ca-file",
            missing.to_str().expect("utf8"),
        ]))
        .expect_err("missing CA file");
        assert!(e.to_string().contains("--amqp-ca-file"), "{e}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let e = Nodes::from_args(&args(&[
            "--amqp-url",
            "amqps://h:5671/%2f",
            "--amqp-ca-file",
            empty.to_str().expect("utf8"),
        ]))
        .expect_err("no certificate in the CA file");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");

        let e = Nodes::from_args(&args(&[
            "--amqp-url",
            "amqps://h:5671/%2f",
            "--amqp-client-cert",
            empty.to_str().expect("utf8"),
        ]))
        .expect_err("a certificate without a key");
        assert!(e.to_string().contains("go together"), "{e}");
    }

    #[test]
    fn a_client_key_must_match_its_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = rcgen::generate_simple_self_signed(vec!["one".into()]).expect("cert");
        let two = rcgen::generate_simple_self_signed(vec!["two".into()]).expect("cert");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let other_key = dir.path().join("other.pem");
        std::fs::write(&cert, one.cert.pem()).expect("write");
        std::fs::write(&key, one.signing_key.serialize_pem()).expect("write");
        std::fs::write(&other_key, two.signing_key.serialize_pem()).expect("write");
        let flags = |key: &Path| {
            args(&[
                "--amqp-url",
                "amqps://h:5671/%2f",
                "--amqp-client-cert",
                cert.to_str().expect("utf8"),
                "--amqp-client-key",
                key.to_str().expect("utf8"),
            ])
        };
        Nodes::from_args(&flags(&key)).expect("matching pair");
        let e = Nodes::from_args(&flags(&other_key)).expect_err("mismatched key");
        assert!(e.to_string().contains("--amqp-client-key"), "{e}");
    }

    #[test]
    fn tls_files_without_an_amqps_url_are_a_mistake() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).expect("cert");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).expect("write");
        let e = Nodes::from_args(&args(&[
            "--amqp-url",
            "amqp://h:5672/%2f",
            "--amqp-ca-file",
            path.to_str().expect("utf8"),
        ]))
        .expect_err("CA file with plain amqp");
        assert!(e.to_string().contains("amqps"), "{e}");
    }
}
