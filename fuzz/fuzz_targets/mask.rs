//! The runner's secret masker: however the log is cut into writes and flushes, no secret (nor its
//! base64 form, nor a line of a multi-line secret) comes out whole, and with nothing to mask the
//! log comes out unchanged.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use outpost_runner::mask::{MASK, Masker, patterns};

#[derive(Debug, Arbitrary)]
struct Input {
    secrets: Vec<String>,
    /// Writes, each followed by a flush when its flag is set (a batch interval ending).
    writes: Vec<(Vec<u8>, bool)>,
}

fuzz_target!(|input: Input| {
    // A job has a handful of secrets of ordinary size; this keeps the automaton small and fast.
    let secrets: Vec<(String, &str)> = input
        .secrets
        .iter()
        .take(6)
        .enumerate()
        .filter(|(_, s)| s.len() <= 200)
        .map(|(i, s)| (format!("S{i}"), s.as_str()))
        .collect();
    let (pats, _too_short) = patterns(secrets.iter().map(|(n, v)| (n.as_str(), *v)));
    let mut masker = Masker::new(pats.clone()).expect("small patterns always build");
    let mut log = Vec::new();
    let mut out = Vec::new();
    for (write, flush) in &input.writes {
        log.extend_from_slice(write);
        masker.push(write, &mut out);
        if *flush {
            masker.flush(&mut out);
        }
    }
    masker.flush(&mut out);
    assert_eq!(masker.held(), 0, "a flush releases everything");
    if pats.is_empty() {
        assert_eq!(out, log, "with nothing to mask the log passes unchanged");
        return;
    }
    for p in &pats {
        // A pattern containing `*` could be formed by a mask next to log text; any other
        // occurrence in the output is a leak.
        if p.contains(&MASK[0]) {
            continue;
        }
        assert!(
            !out.windows(p.len()).any(|w| w == p.as_slice()),
            "a secret pattern of {} bytes leaked",
            p.len()
        );
    }
});
