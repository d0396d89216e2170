//! `EventTable::default().resolve` on arbitrary bytes (the verified webhook
//! body). Invariants: never panics; an `Ok` routing key is well-formed
//! (`[A-Za-z0-9._-]`, 1..=255 bytes, safe as an AMQP routing key); a
//! classified `Ok` only for a body serde_json reads as an object; an
//! unclassified one only for UTF-8; `Err` only for what serde_json refuses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocrolus_relay::EventTable;

fn well_formed(key: &str) -> bool {
    (1..=255).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fuzz_target!(|data: &[u8]| {
    let table = EventTable::default();
    if let Ok(event) = table.resolve(data) {
        assert!(
            well_formed(&event.routing_key),
            "routing key {:?} is not [A-Za-z0-9._-]{{1,255}}",
            event.routing_key
        );
        if event.unclassified.is_none() {
            match serde_json::from_slice::<serde_json::Value>(data) {
                Ok(value) => assert!(
                    value.is_object(),
                    "resolved a body that is not a JSON object"
                ),
                Err(e) => panic!("resolved a body that is not valid JSON: {e}"),
            }
        } else {
            assert!(std::str::from_utf8(data).is_ok(), "published non-UTF-8");
        }
    } else {
        assert!(
            serde_json::from_slice::<serde_json::Value>(data).is_err(),
            "refused a body serde_json reads"
        );
    }
});
