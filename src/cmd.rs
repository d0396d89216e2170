//! Subcommand implementations.

pub mod admin_client;
pub mod check_config;
pub mod healthcheck;
pub mod ocrolus;
pub mod rotate_secret;
pub mod send_test;
pub mod serve;
pub mod spool;
pub mod tail;
