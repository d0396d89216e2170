//! The public listener, step 1 of the pipeline: [`accept`] takes TCP
//! connections, reads the optional PROXY header and does the TLS handshake;
//! [`conn`] serves HTTP on each and hands every request to
//! [`crate::pipeline`]. See docs/architecture.md, "Threads and tasks".

mod accept;
mod conn;
mod idle;
mod slots;
mod tls_stream;
mod transport;

pub use accept::serve;
