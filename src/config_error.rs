//! The error of every configuration boundary: flags, files and reloads. It
//! lives apart from the config module so that the modules the configuration
//! is built from (auth, client, event, tls) do not import it back.

/// A configuration problem, worded for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

impl From<String> for ConfigError {
    fn from(msg: String) -> Self {
        Self(msg)
    }
}
