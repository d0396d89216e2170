//! Shared test harness, one file per role: a whole relay on ephemeral ports
//! ([`relay`]), the broker seen from a consumer ([`broker`]), HTTP clients
//! from polite to adversarial ([`client`]), a TCP proxy that cuts or stalls
//! the broker link ([`fault_proxy`]) and child processes read line by line
//! ([`child`]). Every test uses its own exchange and queue names.
#![allow(dead_code)]

pub mod broker;
pub mod child;
pub mod client;
pub mod fault_proxy;
pub mod relay;

// Each test binary uses some roles only: an unused glob is no mistake here.
#[allow(unused_imports)]
pub use {broker::*, child::*, client::*, fault_proxy::*, relay::*};

pub const SECRET: &str = "integration-test-secret-0123456789";
pub const SECOND_SECRET: &str = "rotated-integration-secret-abcdef";

pub fn unique(prefix: &str) -> String {
    format!("{prefix}.{:016x}", rand::random::<u64>())
}

pub fn now_secs() -> i64 {
    ocrolus_relay::now_ms() / 1000
}
