//! Request bodies from the internet, as `POST /v1/events` and `/v1/batch`
//! read them: the depth check, then parsing and validation. Nothing may
//! panic, and every event accepted must survive its trip through a stream
//! entry unchanged, with a payload that is still JSON text.
//!
//! "JSON text" is the grammar, not what `serde_json::Value` can hold: the
//! first run found `{"userId":"1","payload":4e666}`, a number no f64 can
//! represent. JSON allows it and the payload is forwarded as sent, so that
//! is the documented behaviour (README, API) rather than a bug.
#![no_main]

use gateway::event::{check_depth, parse_batch, parse_event, NewEvent};
use libfuzzer_sys::fuzz_target;
use protocol::EventEntry;

/// The gateway's default limits.
const MAX_DEPTH: usize = 32;
const MAX_BATCH: usize = 1000;

fn check_stored_form(event: &NewEvent) {
    let entry = &event.entry;
    assert!(serde_json::from_str::<&serde_json::value::RawValue>(&entry.payload).is_ok());
    let fields = entry.to_fields();
    let read_back = EventEntry::from_fields(fields.iter().map(|(k, v)| (*k, v.as_ref())))
        .expect("a stored event reads back");
    assert_eq!(&read_back, entry);
}

fuzz_target!(|body: &[u8]| {
    if check_depth(body, MAX_DEPTH).is_err() {
        return;
    }
    if let Ok(event) = parse_event(body, None) {
        check_stored_form(&event);
    }
    if let Ok(events) = parse_batch(body, MAX_BATCH) {
        assert!(!events.is_empty() && events.len() <= MAX_BATCH);
        events.iter().for_each(check_stored_form);
    }
});
