//! Client for Ocrolus' org-level webhook API: [`api`] holds the request and
//! response shapes of the documented OpenAPI file, [`client`] the OAuth2
//! client-credentials token (cached, refreshed on expiry) and the calls.
//! Neither the client secret nor a token ever reaches a log line, an error
//! message or a `Debug` output.

pub mod api;
pub mod client;

pub use client::{Client, ClientConfig, ClientSecret, OcrolusError};
