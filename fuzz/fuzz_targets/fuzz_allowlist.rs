//! `NetPolicy::parse` on arbitrary UTF-8 (the operator-edited allowlist.yaml,
//! reloaded on SIGHUP). Invariants: never panics; `Ok` implies a non-empty
//! allow list (fail closed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocrolus_relay::NetPolicy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = NetPolicy::parse(text) {
        assert!(
            !policy.allowed().is_empty(),
            "NetPolicy::parse returned Ok with an empty allow list"
        );
    }
});
