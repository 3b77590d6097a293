//! The live log's ANSI renderer (`outpost_server::ansi`), with an oracle:
//!
//! 1. however the text is cut into pieces (every `step` characters, and one character at a time,
//!    which is every cut at once), the segments, neighbours of one style joined, are those of one
//!    rendering of the whole text;
//! 2. segments are never empty, neighbours differ in style, and they keep every newline;
//! 3. the segments' text is the input with its escape sequences removed, as [`strip`] defines it,
//!    whenever `strip` can say (it declines the corners where terminals disagree); otherwise it is
//!    at least a subsequence of the input without escape or control characters but `\t` and `\n`.
//!
//! The input is a byte (the step) and the log, decoded as the server decodes it (lossy UTF-8):
//! the renderer only ever sees whole characters.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_server::ansi::{MAX_ESCAPE, Renderer, Segment, Span};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, log)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(log);
    let whole = merge(Renderer::new().render(&text));

    // 1. Cuts change nothing.
    let step = usize::from(cut % 16) + 1;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut r = Renderer::new();
    let mut pieces = Vec::new();
    for group in chars.chunks(step) {
        let start = group[0].0;
        let end = group.last().map(|(i, c)| i + c.len_utf8()).unwrap_or(start);
        pieces.extend(r.render(&text[start..end]));
    }
    assert_eq!(merge(pieces), whole, "cut every {step} characters");
    // `render_into` joins as it goes, which spares an allocation per character.
    let mut r = Renderer::new();
    let mut single = Vec::new();
    let mut buf = [0u8; 4];
    for (_, c) in &chars {
        r.render_into(c.encode_utf8(&mut buf), &mut single);
    }
    assert_eq!(single, whole, "cut between every character");

    // 2. The shape of the segments.
    let one_call = Renderer::new().render(&text);
    assert_eq!(one_call, whole, "one call gives joined segments");
    for s in &whole {
        assert!(!s.text.is_empty(), "an empty segment");
        let span = Span::from(s);
        assert_eq!(span.text, s.text);
        assert!(
            span.class.split(' ').all(|c| c.is_empty()
                || ["b", "dim", "i", "u"].contains(&c)
                || c.starts_with("fg-")
                || c.starts_with("bg-")),
            "an unknown class in {:?}",
            span.class
        );
    }
    let shown: String = whole.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(
        shown.matches('\n').count(),
        text.matches('\n').count(),
        "every newline is kept"
    );

    // 3. The text is the input without its escapes.
    match strip(&text) {
        Some(expected) => assert_eq!(shown, expected, "the text is the input without escapes"),
        None => {
            let mut rest = text.chars();
            for c in shown.chars() {
                assert!(
                    c == '\n' || c == '\t' || !c.is_control(),
                    "a control character {c:?} is shown"
                );
                assert!(
                    rest.any(|d| d == c),
                    "{c:?} is not from the input, in order"
                );
            }
        }
    }
});

fn merge(segments: Vec<Segment>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for s in segments {
        match out.last_mut() {
            Some(last) if last.style == s.style => last.text.push_str(&s.text),
            _ => out.push(s),
        }
    }
    out
}

/// The input without escape sequences, or `None` where this definition does not say.
///
/// Line by line (a newline is always kept and ends any unfinished sequence, which is removed):
/// - `ESC [`, bytes 0x20–0x3F, then a final byte 0x40–0x7E: a CSI sequence, removed;
/// - `ESC ]`, then anything, up to BEL (removed with it) or the next ESC (which starts a new
///   sequence): an OSC string, removed;
/// - `ESC`, bytes 0x20–0x2F, then a final byte 0x30–0x7E (not `P X [ ] ^ _` right after `ESC`):
///   an escape sequence, removed;
/// - an ESC inside an unfinished sequence drops that sequence and starts a new one;
/// - outside sequences, `\r`, the other C0 controls but `\t`, DEL and the C1 controls are
///   removed; every other character is kept.
///
/// Declined (`None`): DCS, SOS, PM and APC strings; a control character, DEL or a non-ASCII
/// character inside a CSI or escape sequence; CAN or SUB inside an OSC string; and runs of
/// escape-sequence bytes of [`MAX_ESCAPE`] bytes or more (the renderer abandons them).
fn strip(text: &str) -> Option<String> {
    #[derive(Clone, Copy, PartialEq)]
    enum St {
        Ground,
        Esc,
        EscInter,
        Csi,
        Osc,
    }
    let mut out = String::new();
    for (k, line) in text.split('\n').enumerate() {
        if k > 0 {
            out.push('\n');
        }
        let mut st = St::Ground;
        // Bytes in escape sequences since the last character outside them.
        let mut run = 0usize;
        for c in line.chars() {
            if st != St::Ground || c == '\x1b' {
                run += c.len_utf8();
                if run >= MAX_ESCAPE {
                    return None;
                }
            }
            if c == '\x1b' && st != St::Ground {
                // Drops the unfinished sequence (or ends an OSC string) and starts another.
                st = St::Esc;
                continue;
            }
            let b = u32::from(c);
            st = match st {
                St::Ground => {
                    run = 0;
                    if c == '\x1b' {
                        run = 1;
                        St::Esc
                    } else {
                        if c == '\t' || !c.is_control() {
                            out.push(c);
                        }
                        St::Ground
                    }
                }
                St::Esc => match b {
                    0x5b => St::Csi,
                    0x5d => St::Osc,
                    0x50 | 0x58 | 0x5e | 0x5f => return None,
                    0x20..=0x2f => St::EscInter,
                    0x30..=0x7e => St::Ground,
                    _ => return None,
                },
                St::EscInter => match b {
                    0x20..=0x2f => St::EscInter,
                    0x30..=0x7e => St::Ground,
                    _ => return None,
                },
                St::Csi => match b {
                    0x20..=0x3f => St::Csi,
                    0x40..=0x7e => St::Ground,
                    _ => return None,
                },
                St::Osc => match b {
                    0x07 => St::Ground,
                    0x18 | 0x1a => return None,
                    _ => St::Osc,
                },
            };
        }
    }
    Some(out)
}
