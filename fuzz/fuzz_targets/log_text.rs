//! How the server turns stored log bytes into the text of live-log events: however the bytes are
//! cut into reads, the text is what one lossy UTF-8 decoding of the whole log gives, and nothing
//! is held back at the end.
//!
//! The text then goes to the browser in SSE framing (`log_stream`) and, with `?format=spans`,
//! through the ANSI renderer (`ansi`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_server::api::take_text;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, log)) = data.split_first() else {
        return;
    };
    // Reads of 1..=16 bytes: small enough to cut characters and invalid sequences everywhere.
    let step = usize::from(cut % 16) + 1;
    let mut carry = Vec::new();
    let mut text = String::new();
    for piece in log.chunks(step) {
        carry.extend_from_slice(piece);
        text.push_str(&take_text(&mut carry, false));
        assert!(carry.len() < 4, "at most an incomplete character is held back");
    }
    text.push_str(&take_text(&mut carry, true));
    assert!(carry.is_empty(), "the final flush holds nothing back");
    assert_eq!(text, String::from_utf8_lossy(log), "reads change the text");
});
