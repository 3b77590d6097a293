//! Secret masking for the job log: every occurrence of a secret becomes `***` before the log is
//! buffered, spooled or uploaded.
//!
//! What is masked, for each secret value of at least [`MIN_SECRET_LEN`] bytes: the value itself,
//! each non-empty line of a multi-line value (without its `\r`), the value's standard and URL-safe
//! base64 encodings (padded and unpadded), and each line of the 76-column wrapped encoding that the
//! `base64` tool prints.
//! Shorter values are not masked: masking `a` would destroy the log.
//!
//! The masker works on a stream that arrives in pieces. Every byte covered by any occurrence of any
//! pattern is replaced, and each run of covered bytes becomes one `***`, so overlapping secrets hide
//! each other completely. An occurrence may be split across writes: the masker holds back only the
//! longest suffix of what it has seen that is a proper prefix of some pattern, and releases it as
//! soon as later bytes show whether it is a secret, or when the caller [`Masker::flush`]es it
//! (the log flushes at the latest after one batch interval, so masking never delays output by
//! more). A few bytes already released are kept as context, so that the rest of an occurrence
//! whose beginning had to be released by a flush is still masked.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;

/// What every occurrence of a secret is replaced with.
pub const MASK: &[u8] = b"***";

/// Values shorter than this are not masked.
pub const MIN_SECRET_LEN: usize = 3;

/// Width of the lines the `base64` tool wraps its output at.
const BASE64_WRAP: usize = 76;
/// Wrapped base64 lines shorter than this are not masked on their own (the last line of a wrapped
/// encoding can be a few characters that occur in ordinary text).
const MIN_WRAPPED_LINE: usize = 16;

/// The byte strings to mask for `secrets` (name, value), and the names of the secrets that are too
/// short to mask.
pub fn patterns<'a>(
    secrets: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> (Vec<Vec<u8>>, Vec<String>) {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut too_short = Vec::new();
    for (name, value) in secrets {
        if value.is_empty() {
            continue;
        }
        if value.len() < MIN_SECRET_LEN {
            too_short.push(name.to_string());
            continue;
        }
        let bytes = value.as_bytes();
        out.push(bytes.to_vec());
        if value.contains('\n') {
            for line in value.split('\n') {
                let line = line.trim_end_matches('\r');
                if line.len() >= MIN_SECRET_LEN {
                    out.push(line.as_bytes().to_vec());
                }
            }
        }
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            out.push(engine.encode(bytes).into_bytes());
        }
        let wrapped = STANDARD.encode(bytes);
        if wrapped.len() > BASE64_WRAP {
            for chunk in wrapped.as_bytes().chunks(BASE64_WRAP) {
                if chunk.len() >= MIN_WRAPPED_LINE {
                    out.push(chunk.to_vec());
                }
            }
        }
    }
    out.sort();
    out.dedup();
    (out, too_short)
}

/// The patterns and the automaton that finds them.
struct Matcher {
    ac: AhoCorasick,
    patterns: Vec<Vec<u8>>,
    /// Length of the longest pattern.
    longest: usize,
    /// Whether some pattern starts with this byte.
    first: [bool; 256],
}

impl Matcher {
    /// Start of the longest suffix of `buf` that is a proper prefix of some pattern (a secret that
    /// may go on in the next write), or `buf.len()` when there is none.
    fn hold_start(&self, buf: &[u8]) -> usize {
        let len = buf.len();
        let from = len.saturating_sub(self.longest.saturating_sub(1));
        (from..len)
            .find(|&i| {
                let tail = &buf[i..];
                self.first[tail[0] as usize]
                    && self
                        .patterns
                        .iter()
                        .any(|p| p.len() > tail.len() && p.starts_with(tail))
            })
            .unwrap_or(len)
    }
}

/// What the masker does with its input.
enum Mode {
    /// No secrets: bytes pass through untouched.
    PassThrough,
    /// Mask the patterns.
    Mask(Box<Matcher>),
    /// The patterns could not be prepared: nothing is let through rather than risk a leak.
    WithholdAll,
}

/// Why the secrets could not be prepared for masking.
#[derive(Debug, thiserror::Error)]
#[error("the job's secrets could not be prepared for masking: {0}")]
pub struct MaskError(#[from] aho_corasick::BuildError);

/// A streaming masker for one job's log.
pub struct Masker {
    mode: Mode,
    /// Input kept: first context that was already released, then bytes held back.
    buf: Vec<u8>,
    /// `buf[..released]` was already released.
    released: usize,
    /// Input offset of `buf[0]`.
    base: u64,
    /// Whether the last byte released was part of a mask, so that a run that goes on in the next
    /// write does not get a second `***`.
    in_mask: bool,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never show the patterns or the held bytes: they are secrets.
        f.debug_struct("Masker")
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

impl Default for Masker {
    fn default() -> Self {
        Self::none()
    }
}

impl Masker {
    /// A masker that masks nothing.
    pub fn none() -> Self {
        Self {
            mode: Mode::PassThrough,
            buf: Vec::new(),
            released: 0,
            base: 0,
            in_mask: false,
        }
    }

    /// A masker for these patterns (see [`patterns`]); empty patterns are ignored.
    pub fn new(patterns: Vec<Vec<u8>>) -> Result<Self, MaskError> {
        let patterns: Vec<Vec<u8>> = patterns.into_iter().filter(|p| !p.is_empty()).collect();
        if patterns.is_empty() {
            return Ok(Self::none());
        }
        // Standard semantics: the overlapping search reports every occurrence of every pattern.
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(&patterns)?;
        let mut first = [false; 256];
        for p in &patterns {
            first[p[0] as usize] = true;
        }
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        Ok(Self {
            mode: Mode::Mask(Box::new(Matcher {
                ac,
                patterns,
                longest,
                first,
            })),
            ..Self::none()
        })
    }

    /// Adds patterns (see [`patterns`]) to mask from now on, keeping what is held back.
    pub fn add(&mut self, more: Vec<Vec<u8>>) -> Result<(), MaskError> {
        let mut all = match &self.mode {
            Mode::PassThrough => Vec::new(),
            Mode::Mask(m) => m.patterns.clone(),
            Mode::WithholdAll => return Ok(()),
        };
        all.extend(more.into_iter().filter(|p| !p.is_empty()));
        all.sort();
        all.dedup();
        let fresh = Self::new(all)?;
        self.mode = fresh.mode;
        Ok(())
    }

    /// A masker that lets nothing through (for when the secrets could not be prepared).
    pub fn withhold_all() -> Self {
        Self {
            mode: Mode::WithholdAll,
            ..Self::none()
        }
    }

    /// Whether this masker changes anything.
    pub fn is_active(&self) -> bool {
        !matches!(self.mode, Mode::PassThrough)
    }

    /// Masks `data`, the next piece of the stream, and appends to `out` what can be released now.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.process(data, out, false);
    }

    /// Releases everything held back, masking what is complete; keeps a little context so that
    /// the rest of a secret that was cut short here is still masked when it comes.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        self.process(&[], out, true);
    }

    /// Bytes held back.
    pub fn held(&self) -> usize {
        self.buf.len() - self.released
    }

    /// Input offsets (bytes pushed so far) of the bytes held back.
    pub fn held_range(&self) -> std::ops::Range<u64> {
        let len = self.buf.len() as u64;
        self.base + self.released as u64..self.base + len
    }

    fn process(&mut self, data: &[u8], out: &mut Vec<u8>, release_all: bool) {
        let matcher = match &self.mode {
            Mode::PassThrough => {
                out.extend_from_slice(data);
                return;
            }
            Mode::WithholdAll => {
                if !data.is_empty() && !self.in_mask {
                    out.extend_from_slice(MASK);
                    self.in_mask = true;
                }
                return;
            }
            Mode::Mask(m) => m,
        };
        self.buf.extend_from_slice(data);
        let buf = &self.buf;
        let len = buf.len();
        let hold = matcher.hold_start(buf);

        // Runs of covered bytes, merged when they overlap or touch. The overlapping search reports
        // occurrences in order of their end, so each new one can only merge with the last runs.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for m in matcher.ac.find_overlapping_iter(buf.as_slice()) {
            let (mut start, mut end) = (m.start(), m.end());
            if end <= self.released {
                continue;
            }
            while let Some(&(s, e)) = runs.last() {
                if e < start {
                    break;
                }
                start = start.min(s);
                end = end.max(e);
                runs.pop();
            }
            runs.push((start, end));
        }

        // Release up to where a secret might still begin, and through any run known to be covered.
        let mut limit = if release_all {
            len
        } else {
            hold.max(self.released)
        };
        for &(s, e) in &runs {
            if s < limit && e > limit {
                limit = e;
            }
        }

        let mut pos = self.released;
        for &(s, e) in &runs {
            if s >= limit {
                break;
            }
            if e <= pos {
                continue;
            }
            let s = s.max(pos);
            if s > pos {
                out.extend_from_slice(&buf[pos..s]);
                self.in_mask = false;
            }
            if !self.in_mask {
                out.extend_from_slice(MASK);
                self.in_mask = true;
            }
            pos = e.min(limit);
        }
        if pos < limit {
            out.extend_from_slice(&buf[pos..limit]);
            self.in_mask = false;
        }

        // Only bytes from `hold` on can begin an occurrence that later bytes complete.
        let keep = hold.min(limit);
        self.buf.drain(..keep);
        self.base += keep as u64;
        self.released = limit - keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(secrets: &[&str]) -> Masker {
        let (p, _) = patterns(secrets.iter().map(|s| ("S", *s)));
        Masker::new(p).unwrap()
    }

    /// Pushes `pieces` one by one, then flushes; answers the output.
    fn run(m: &mut Masker, pieces: &[&[u8]]) -> String {
        let mut out = Vec::new();
        for p in pieces {
            m.push(p, &mut out);
        }
        m.flush(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_secret_split_at_every_position_across_two_writes_is_masked() {
        let secret = "hunter2-Secret";
        let text = format!("before {secret} after\n");
        for cut in 0..=text.len() {
            let mut m = masker(&[secret]);
            let (a, b) = text.as_bytes().split_at(cut);
            let mut out = Vec::new();
            m.push(a, &mut out);
            // Nothing held back may be a released secret, and what was released is final.
            assert!(!String::from_utf8_lossy(&out).contains(secret));
            m.push(b, &mut out);
            m.flush(&mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "before *** after\n",
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_secret_written_one_byte_at_a_time_is_masked() {
        let secret = "abc-def-ghi";
        let text = format!("x{secret}y{secret}");
        let mut m = masker(&[secret]);
        let pieces: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        assert_eq!(run(&mut m, &pieces), "x***y***");
    }

    #[test]
    fn only_a_possible_beginning_of_a_secret_is_held_back() {
        let mut m = masker(&["password123"]);
        let mut out = Vec::new();
        m.push(b"the pass", &mut out);
        assert_eq!(out, b"the ");
        assert_eq!(m.held(), 4);
        m.push(b"port is 42\n", &mut out);
        assert_eq!(out, b"the passport is 42\n");
        assert_eq!(m.held(), 0);
    }

    #[test]
    fn each_line_of_a_multi_line_secret_is_masked() {
        let key = "-----BEGIN KEY-----\r\nAAAAline2\r\n-----END KEY-----\r\n";
        let mut m = masker(&[key]);
        // The whole value, in one piece.
        assert_eq!(run(&mut m, &[key.as_bytes()]), "***");
        // Line by line, as a tool that reformats it would print it.
        let mut m = masker(&[key]);
        let out = run(
            &mut m,
            &[
                b"key: -----BEGIN KEY-----\n",
                b"AAAAline2\n-----END KEY-----\n",
            ],
        );
        assert_eq!(out, "key: ***\n***\n***\n");
    }

    #[test]
    fn the_base64_forms_are_masked() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let secret = "s3cr3t?>value~~";
        let std = STANDARD.encode(secret);
        let url = URL_SAFE_NO_PAD.encode(secret);
        assert_ne!(
            std.trim_end_matches('='),
            url,
            "the test needs both alphabets"
        );
        let mut m = masker(&[secret]);
        let out = run(&mut m, &[format!("a={std} b={url}\n").as_bytes()]);
        assert_eq!(out, "a=*** b=***\n");

        // A long value, as `base64` prints it: wrapped at 76 columns.
        let long = "k".repeat(200);
        let encoded = STANDARD.encode(&long);
        let wrapped: Vec<&str> = encoded
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let mut m = masker(&[&long]);
        let out = run(&mut m, &[format!("{}\n", wrapped.join("\n")).as_bytes()]);
        assert!(
            !out.contains(wrapped[0]) && !out.contains(wrapped[1]),
            "{out}"
        );
    }

    #[test]
    fn overlapping_secrets_hide_each_other_completely() {
        let mut m = masker(&["abcdef", "defghi", "ghi"]);
        assert_eq!(run(&mut m, &[b"[abcdefghi]"]), "[***]");
        // Split where the second one begins, and where only the first is complete.
        let mut m = masker(&["abcdef", "defghi"]);
        assert_eq!(run(&mut m, &[b"[abcdef", b"ghi]"]), "[***]");
        let mut m = masker(&["abcd", "cdxy"]);
        assert_eq!(run(&mut m, &[b"[abcd", b"zz]"]), "[***zz]");
        // One secret inside another.
        let mut m = masker(&["token", "my-token-value"]);
        assert_eq!(run(&mut m, &[b"my-token-val", b"ue token"]), "*** ***");
        // Touching occurrences are one run.
        let mut m = masker(&["abc"]);
        assert_eq!(run(&mut m, &[b"abcabc", b"abc."]), "***.");
    }

    #[test]
    fn a_secret_at_the_very_end_is_masked_by_the_flush() {
        // `abc` is also the beginning of `abcdef`, so it is held back until the flush.
        let mut m = masker(&["abc", "abcdef"]);
        let mut out = Vec::new();
        m.push(b"end: abc", &mut out);
        assert_eq!(out, b"end: ");
        m.flush(&mut out);
        assert_eq!(out, b"end: ***");
        assert_eq!(m.held(), 0);
    }

    #[test]
    fn after_a_flush_the_rest_of_a_secret_is_still_masked() {
        let mut m = masker(&["abcdef"]);
        let mut out = Vec::new();
        m.push(b"abc", &mut out);
        m.flush(&mut out);
        m.push(b"def!", &mut out);
        m.flush(&mut out);
        // The beginning had to go out; the rest did not.
        assert_eq!(out, b"abc***!");
    }

    #[test]
    fn a_2_mib_line_with_a_secret_in_the_middle() {
        let secret = "the-secret-in-the-middle";
        let mut line = vec![b'x'; 1024 * 1024];
        line.extend_from_slice(secret.as_bytes());
        line.extend_from_slice(&vec![b'y'; 1024 * 1024]);
        let mut m = masker(&[secret]);
        let mut out = Vec::new();
        // As the pipe delivers it: 64 KiB at a time, so the secret is likely cut.
        for chunk in line.chunks(64 * 1024 - 7) {
            m.push(chunk, &mut out);
            assert!(m.held() < secret.len());
        }
        m.flush(&mut out);
        assert_eq!(out.len(), line.len() - secret.len() + MASK.len());
        assert!(out.windows(MASK.len()).any(|w| w == MASK));
        assert!(!out.windows(secret.len()).any(|w| w == secret.as_bytes()));
        // In one write, too.
        let mut m = masker(&[secret]);
        let mut out = Vec::new();
        m.push(&line, &mut out);
        m.flush(&mut out);
        assert_eq!(out.len(), line.len() - secret.len() + MASK.len());
    }

    #[test]
    fn short_and_empty_values_are_not_masked_but_reported() {
        let (p, short) = patterns([("A", "ab"), ("B", ""), ("C", "abc")]);
        assert_eq!(short, vec!["A".to_string()]);
        assert!(p.contains(&b"abc".to_vec()));
        assert!(!p.iter().any(|p| p == b"ab"));
        let mut m = Masker::new(p).unwrap();
        assert_eq!(run(&mut m, &[b"ab abc"]), "ab ***");
    }

    #[test]
    fn without_secrets_nothing_changes_and_nothing_is_held() {
        let mut m = masker(&[]);
        assert!(!m.is_active());
        let mut out = Vec::new();
        m.push(b"plain", &mut out);
        assert_eq!(out, b"plain");
        assert_eq!(m.held(), 0);
    }

    #[test]
    fn secrets_added_later_are_masked_from_then_on() {
        let mut m = masker(&[]);
        let mut out = Vec::new();
        m.push(b"token=", &mut out);
        m.add(patterns([("T", "ghp_abcdef")]).0).unwrap();
        m.push(b"ghp_abcdef ghp_abc", &mut out);
        m.push(b"def\n", &mut out);
        m.flush(&mut out);
        assert_eq!(out, b"token=*** ***\n");
    }

    #[test]
    fn debug_does_not_show_secrets() {
        let mut m = masker(&["topsecret"]);
        let mut out = Vec::new();
        m.push(b"topsec", &mut out);
        let shown = format!("{m:?}");
        assert!(!shown.contains("topsec"), "{shown}");
    }
}
