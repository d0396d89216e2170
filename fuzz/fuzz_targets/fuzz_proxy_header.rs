//! `proxy_protocol::parse` on arbitrary bytes (the PROXY v1/v2 header sent
//! by whatever connects to the public listener). Invariant: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocrolus_relay::parse_proxy_header;

fuzz_target!(|data: &[u8]| {
    let _ = parse_proxy_header(data);
});
