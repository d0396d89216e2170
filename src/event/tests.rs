use serde::Deserialize;

use super::*;

fn resolve(body: &str) -> Result<Event, EventError> {
    EventTable::default().resolve(body.as_bytes())
}

fn key(body: &str) -> String {
    resolve(body).expect(body).routing_key
}

#[test]
fn known_list_is_sorted_and_unique() {
    let mut sorted = KNOWN_EVENTS.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, KNOWN_EVENTS.to_vec());
}

#[test]
fn every_known_org_event_maps_to_itself() {
    for name in KNOWN_EVENTS {
        let e = resolve(&format!(r#"{{"event_name":"{name}","book_uuid":"x"}}"#)).expect(name);
        assert_eq!(e.routing_key, name);
        assert_eq!(e.name_as_sent, name);
        assert_eq!(metric_label(name), name);
    }
}

#[test]
fn event_field_is_accepted_too() {
    assert_eq!(key(r#"{"event":"book.verified"}"#), "book.verified");
}

#[test]
fn account_level_names_map_to_org_twins() {
    assert_eq!(
        key(r#"{"event_name":"ANALYTICS_COMPLETED"}"#),
        "book.analytics_completed"
    );
    assert_eq!(
        key(r#"{"event_name":"BOOK_VERIFIED","status":"BOOK_COMPLETE"}"#),
        "book.verified"
    );
    assert_eq!(
        key(r#"{"event_name":"DOC_VERIFIED","status":"VERIFICATION_COMPLETE"}"#),
        "document.verification_succeeded"
    );
    assert_eq!(
        key(r#"{"event_name":"DOC_VERIFIED","status":"REJECTED"}"#),
        "document.verification_failed"
    );
    assert_eq!(
        key(r#"{"event_name":"IMAGE_GROUP_VERIFIED","status":"VERIFICATION_FAILED"}"#),
        "image_group.verification_failed"
    );
    assert_eq!(
        key(r#"{"event_name":"IMAGE_GROUP_VERIFIED","status":"VERIFICATION_COMPLETE"}"#),
        "image_group.verification_succeeded"
    );
    let e = resolve(r#"{"event_name":"DOC_VERIFIED","status":"REJECTED"}"#).expect("doc");
    assert_eq!(e.name_as_sent, "DOC_VERIFIED");
}

#[test]
fn legacy_status_only_payloads() {
    // Ocrolus' own account-level test payload.
    let e = resolve(r#"{"status": "VERIFICATION_COMPLETE", "uploaded_doc_pk": 0, "book_pk": 0}"#)
        .expect("legacy");
    assert_eq!(e.routing_key, "document.verification_succeeded");
    assert_eq!(e.name_as_sent, "VERIFICATION_COMPLETE");
    assert_eq!(
        key(r#"{"status":"REJECTED"}"#),
        "document.verification_failed"
    );
    assert_eq!(key(r#"{"status":"BOOK_COMPLETE"}"#), "book.verified");
}

#[test]
fn unknown_well_formed_names_are_kept() {
    let e = resolve(r#"{"event_name":"book.something_new","status":"X"}"#).expect("new");
    assert_eq!(e.routing_key, "book.something_new");
    assert_eq!(metric_label(&e.routing_key), "other");
    assert_eq!(
        key(r#"{"event_name":"MIDDESK_VERIFIED"}"#),
        "MIDDESK_VERIFIED"
    );
}

fn reason(body: &str) -> Option<Unclassified> {
    let e = resolve(body).expect(body);
    assert_eq!(
        e.routing_key == UNCLASSIFIED_KEY,
        e.unclassified.is_some(),
        "{body}"
    );
    assert_eq!(
        e.unclassified,
        unclassified_reason(body.as_bytes()),
        "{body}"
    );
    e.unclassified
}

#[test]
fn only_bodies_that_are_not_json_are_refused() {
    for body in [
        "{not json",
        "",
        r#"{"event_name":"book.verified"} trailing"#,
        r#"{"a":01}"#,
    ] {
        assert_eq!(resolve(body), Err(EventError::InvalidJson), "{body}");
    }
}

/// Regression: an authentic body was refused with 400 for its content (and
/// lost after Ocrolus' 3 retries); now it is published unclassified.
#[test]
fn unclassifiable_json_resolves_to_unclassified_with_a_reason() {
    use Unclassified as U;
    let long = format!(r#"{{"event_name":"{}"}}"#, "a".repeat(256));
    let cases = [
        (r#"["book.verified"]"#, U::NotAnObject),
        ("42", U::NotAnObject),
        (r#"{"book_uuid":"x"}"#, U::NoEvent),
        (r#"{"status":"SOMETHING"}"#, U::UnknownStatus),
        (r#"{"event_name":"bad name!"}"#, U::BadEventName),
        (r#"{"event_name":"book.*"}"#, U::BadEventName),
        (r#"{"event_name":""}"#, U::BadEventName),
        (long.as_str(), U::BadEventName),
        (r#"{"event_name":"ocrolus.unclassified"}"#, U::BadEventName),
        (
            r#"{"event_name":"book.verified","n":1e400}"#,
            U::NumberOutOfRange,
        ),
        (
            r#"{"event_name":"book.verified","n":-1e309}"#,
            U::NumberOutOfRange,
        ),
        (
            r#"{"event_name":"book.verified","x":"\ud800"}"#,
            U::LoneSurrogate,
        ),
        (
            r#"{"event_name":"book.verified","event_name":"book.completed"}"#,
            U::UnreadableFields,
        ),
    ];
    for (body, expected) in cases {
        assert_eq!(reason(body), Some(expected), "{body}");
    }
    let deep = format!(
        r#"{{"event_name":"book.verified","x":{}{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    // Strict consumers could not read it, whatever field it is in.
    assert_eq!(reason(&deep), Some(U::UnreadableFields));
    assert_eq!(reason(r#"{"event_name":"book.verified"}"#), None);
}

#[test]
fn non_string_name_counts_as_absent() {
    assert_eq!(
        key(r#"{"event_name":5,"status":"REJECTED"}"#),
        "document.verification_failed"
    );
}

#[test]
fn escaped_names_are_decoded() {
    assert_eq!(
        key(r#"{"event_name":"book\u002everified"}"#),
        "book.verified"
    );
}

#[test]
fn aliases_extend_the_table() {
    let t = EventTable::with_aliases(&["MIDDESK_VERIFIED=middesk.verified".into()]).expect("alias");
    assert_eq!(
        t.resolve(br#"{"event_name":"MIDDESK_VERIFIED"}"#)
            .expect("ok")
            .routing_key,
        "middesk.verified"
    );
    assert!(EventTable::with_aliases(&["nope".into()]).is_err());
    assert!(EventTable::with_aliases(&["A=b c".into()]).is_err());
}

#[test]
fn invalid_text_is_refused_and_lone_surrogates_are_unclassified() {
    // fuzz/fuzz_event (docs/fuzzing.md): fields other than event_name, event
    // and status were skipped without decoding. Invalid UTF-8 is not JSON
    // text (RFC 8259 8.1): refused. A lone surrogate escape is JSON, but
    // strict parsers refuse it: it never goes out under an event's key.
    let mut body = br#"{"event_name":"book.verified","book_uuid":"940cd2ca-"#.to_vec();
    body.extend([0xd0, 0xd0, b'"', b'}']);
    assert_eq!(
        EventTable::default().resolve(&body),
        Err(EventError::InvalidJson)
    );
    for body in [
        r#"{"event_name":"book.verified","note":"\ud800"}"#,
        r#"{"event_name":"book.verified","\udc00":1}"#,
        r#"{"event_name":"book.verified","a":[{"b":"\udbff\u0041"}]}"#,
        r#"["\ud800"]"#,
    ] {
        assert_eq!(reason(body), Some(Unclassified::LoneSurrogate), "{body}");
    }
    assert_eq!(
        reason(r#"["\ud83d\ude00"]"#),
        Some(Unclassified::NotAnObject)
    );
    // Valid escapes and non-ASCII text elsewhere still resolve.
    assert_eq!(
        key(r#"{"event_name":"book.verified","n":"\ud83d\ude00 é","x":[1,-2.5e3,null,true,{}]}"#),
        "book.verified"
    );
}

/// The fields resolution reads, read by serde's derive over the whole
/// body: what `classify` did before the scanner found the members itself,
/// kept as the oracle of the test below.
#[derive(Deserialize)]
struct SerdeProbe<'a> {
    #[serde(borrow, default, deserialize_with = "string_or_none")]
    event_name: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "string_or_none")]
    event: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "string_or_none")]
    status: Option<Cow<'a, str>>,
}

/// A member's value as serde's derive reads it: a string, or anything else.
#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrOther<'a> {
    Str(#[serde(borrow)] Cow<'a, str>),
    Other(serde::de::IgnoredAny),
}

fn string_or_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Cow<'de, str>>, D::Error> {
    Ok(match StrOrOther::deserialize(d)? {
        StrOrOther::Str(s) => Some(s),
        StrOrOther::Other(_) => None,
    })
}

/// What serde's reading of the members leads to, for a body that is an
/// object of valid JSON: the name as sent, or why it is unclassified.
fn serde_reading(body: &str) -> (String, Option<Unclassified>) {
    let Ok(probe) = serde_json::from_str::<SerdeProbe>(body) else {
        return (String::new(), Some(Unclassified::UnreadableFields));
    };
    if let Some(name) = probe.event_name.or(probe.event) {
        return if is_well_formed(&name) && !name.starts_with(RESERVED_PREFIX) {
            (name.into_owned(), None)
        } else {
            (String::new(), Some(Unclassified::BadEventName))
        };
    }
    match probe.status {
        None => (String::new(), Some(Unclassified::NoEvent)),
        Some(status) => match LEGACY_STATUS_MAP
            .iter()
            .find(|(legacy, _)| *legacy == status)
        {
            Some((legacy, _)) => ((*legacy).to_owned(), None),
            None => (String::new(), Some(Unclassified::UnknownStatus)),
        },
    }
}

/// The top-level members are found by the grammar check, not by serde:
/// over every pair and a spread of triples of awkward members (escaped and
/// look-alike keys, repeats, non-string and nested values, escaped values),
/// the event is read as serde's derive reads it.
#[test]
fn members_are_read_as_serde_reads_them() {
    let keys = [
        "event_name",
        "event",
        "status",
        r"event\u005fname",
        r"ev\u0065nt",
        r"stat\u0075s",
        "Event",
        "event_name ",
        "other",
        r#"\"event\""#,
    ];
    let values = [
        r#""book.verified""#,
        r#""DOC_VERIFIED""#,
        r#""VERIFICATION_COMPLETE""#,
        r#""REJECTED""#,
        r#""book\u002everified""#,
        r#""bad name""#,
        r#""ocrolus.x""#,
        r#""""#,
        "1",
        "null",
        "true",
        r#"{"event_name":"book.completed","status":"REJECTED"}"#,
        r#"["book.verified"]"#,
    ];
    let members: Vec<String> = keys
        .iter()
        .flat_map(|k| values.iter().map(move |v| format!(r#""{k}" : {v}"#)))
        .collect();
    let mut bodies = Vec::new();
    for a in &members {
        bodies.push(format!("{{{a}}}"));
        for b in &members {
            bodies.push(format!(r#"{{{a},{b}}}"#));
        }
    }
    // Triples: a fixed stride through all of them (odd, so it wraps over
    // every position).
    let n = members.len();
    for i in (0..n * n * n).step_by(97) {
        let (a, b, c) = (&members[i % n], &members[(i / n) % n], &members[i / n / n]);
        bodies.push(format!("{{ {a} ,\n{b}\t, {c} }}"));
    }
    for body in &bodies {
        let event = resolve(body).expect(body);
        assert_eq!(
            (event.name_as_sent, event.unclassified),
            serde_reading(body),
            "{body}"
        );
    }
    assert!(bodies.len() > 20_000, "{}", bodies.len());
}

/// Random edits (a fixed seed) of a few deliveries with awkward members:
/// wherever an edit leaves a JSON object, the event is read as serde's
/// derive reads it, and an edit that leaves anything else never panics.
#[test]
fn edited_bodies_are_read_as_serde_reads_them() {
    let seeds = [
        r#"{"event_name":"book.verified","x":{"event":"a.b"},"status":"REJECTED"}"#,
        r#"{"ev\u0065nt":"book.completed","event_name":null,"arr":[1,2,{"status":"x"}]}"#,
        r#"{"status":"VERIFICATION_COMPLETE","n":-1.5e3,"s":"a\"b\\c"}"#,
        r#"  { "event" : "doc.x" , "event" : 1 }  "#,
        r#"{"status":{"event":"REJECTED"},"event_name":[{}],"status":"REJECTED"}"#,
    ];
    let alphabet = b"{}[]\":,\\ aeEnvt_su0123456789.-\x00lr";
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % 1_000_003).expect("small")
    };
    let mut objects = 0;
    for i in 0..200_000 {
        let mut body = seeds[i % seeds.len()].as_bytes().to_vec();
        for _ in 0..next() % 4 {
            let at = next() % (body.len() + 1);
            let byte = alphabet[next() % alphabet.len()];
            match next() % 3 {
                0 if at < body.len() => {
                    body.remove(at);
                }
                1 => body.insert(at, byte),
                _ if at < body.len() => body[at] = byte,
                _ => {}
            }
        }
        let read = EventTable::default().resolve(&body);
        let Ok(text) = std::str::from_utf8(&body) else {
            continue;
        };
        if !serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v.is_object()) {
            continue;
        }
        objects += 1;
        let event = read.expect(text);
        assert_eq!(
            (event.name_as_sent, event.unclassified),
            serde_reading(text),
            "{text}"
        );
    }
    assert!(objects > 50_000, "{objects}");
}
