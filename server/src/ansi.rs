//! Renders a job log's ANSI escapes as styled segments, for the web UI's live log.
//!
//! The escape sequences are recognised by `anstyle-parse` (rust-cli's fork of Alacritty's `vte`,
//! an implementation of Paul Williams' DEC parser state machine); this module only gives meaning
//! to SGR (`CSI … m`) and keeps the style in `anstyle`'s [`Style`].
//! The renderer is stateful: the style and an unfinished escape sequence carry over from one
//! [`Renderer::render`] call to the next, so text cut anywhere renders as if it came in one piece.
//!
//! What the output keeps, precisely:
//! - every printable character, `\t` and `\n`, in order;
//! - not escape sequences (CSI, OSC, DCS, SOS/PM/APC, two-byte `ESC x`), of which only SGR has an
//!   effect (bold, dim, italic, underline, and foreground/background colours: one of the 16
//!   named colours, an index into the 256-colour palette, or RGB);
//! - not `\r` (as the browser did before: a progress bar's redraws show one after another) nor the
//!   other C0 and C1 control characters, nor DEL.
//!
//! A newline always ends an unfinished escape sequence (which is dropped), so that the output has
//! exactly the input's newlines and a viewer can number lines from either.
//! An escape sequence longer than [`MAX_ESCAPE`] bytes is abandoned, which bounds the parser's
//! memory; the bytes after that point render as text.

use anstyle::{Ansi256Color, Color, Effects, RgbColor, Style};
use anstyle_parse::{Params, Parser, Perform};
use serde::Serialize;

/// The longest escape sequence (in bytes) the renderer follows before abandoning it.
pub const MAX_ESCAPE: usize = 4096;

/// A run of text in one style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The text, without escape sequences.
    pub text: String,
    /// Its style.
    pub style: Style,
}

/// A [`Segment`] as the browser gets it: CSS classes of `app.css`, and inline colours for the
/// colours that have no class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Span {
    /// The text, for `textContent`.
    pub text: String,
    /// Space-separated classes: `b`, `dim`, `i`, `u`, `fg-<name>`, `bg-<name>` (`<name>` is one of
    /// the 8 colours, or `bright-` and one of them); absent when empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub class: String,
    /// A foreground colour without a class, as CSS `rgb(r,g,b)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fg: Option<String>,
    /// A background colour without a class, as CSS `rgb(r,g,b)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bg: Option<String>,
}

impl From<&Segment> for Span {
    fn from(s: &Segment) -> Self {
        let st = s.style;
        let fx = st.get_effects();
        let mut class = Vec::new();
        for (effect, name) in [
            (Effects::BOLD, "b"),
            (Effects::DIMMED, "dim"),
            (Effects::ITALIC, "i"),
            (Effects::UNDERLINE, "u"),
        ] {
            if fx.contains(effect) {
                class.push(name.to_owned());
            }
        }
        let (fg_class, fg) = css(st.get_fg_color(), "fg");
        let (bg_class, bg) = css(st.get_bg_color(), "bg");
        class.extend(fg_class);
        class.extend(bg_class);
        Span {
            text: s.text.clone(),
            class: class.join(" "),
            fg,
            bg,
        }
    }
}

const NAMES: [&str; 8] = [
    "black", "red", "green", "yellow", "blue", "magenta", "cyan", "white",
];

/// A colour as either a class (`fg-red`, `bg-bright-blue`) or a CSS `rgb(…)` value.
fn css(color: Option<Color>, prefix: &str) -> (Option<String>, Option<String>) {
    let index = match color {
        None => return (None, None),
        Some(Color::Ansi(c)) => Ansi256Color::from_ansi(c).index(),
        Some(Color::Ansi256(c)) => c.index(),
        Some(Color::Rgb(RgbColor(r, g, b))) => return (None, Some(format!("rgb({r},{g},{b})"))),
    };
    match index {
        0..8 => (Some(format!("{prefix}-{}", NAMES[index as usize])), None),
        8..16 => (
            Some(format!("{prefix}-bright-{}", NAMES[index as usize - 8])),
            None,
        ),
        // The xterm palette: a 6×6×6 cube, then 24 greys.
        232.. => {
            let v = 8 + (index - 232) * 10;
            (None, Some(format!("rgb({v},{v},{v})")))
        }
        _ => {
            let n = index - 16;
            let level = |x: u8| if x == 0 { 0 } else { 55 + x * 40 };
            let (r, g, b) = (level(n / 36), level(n / 6 % 6), level(n % 6));
            (None, Some(format!("rgb({r},{g},{b})")))
        }
    }
}

/// Renders text with ANSI escapes into [`Segment`]s, across calls.
#[derive(Debug, Default)]
pub struct Renderer {
    parser: Parser,
    sink: Sink,
    /// Bytes given to the parser since it last did something: the length of an unfinished
    /// escape sequence (or of a multi-byte character, at most 3).
    pending: usize,
}

#[derive(Debug, Default)]
struct Sink {
    style: Style,
    out: Vec<Segment>,
    /// Set by every parser callback; a byte that sets none is part of an unfinished sequence.
    acted: bool,
}

impl Renderer {
    /// A renderer in the default style.
    pub fn new() -> Self {
        Self::default()
    }

    /// The style the next text will have.
    pub fn style(&self) -> Style {
        self.sink.style
    }

    /// Renders the next piece of the text; consecutive segments have different styles.
    pub fn render(&mut self, text: &str) -> Vec<Segment> {
        let mut out = Vec::new();
        self.render_into(text, &mut out);
        out
    }

    /// Renders the next piece of the text onto the end of `out`, joining the first new segment to
    /// `out`'s last one if they have the same style.
    pub fn render_into(&mut self, text: &str, out: &mut Vec<Segment>) {
        std::mem::swap(&mut self.sink.out, out);
        for piece in text.split_inclusive('\n') {
            let (body, newline) = match piece.strip_suffix('\n') {
                Some(body) => (body, true),
                None => (piece, false),
            };
            for &b in body.as_bytes() {
                self.sink.acted = false;
                self.parser.advance(&mut self.sink, b);
                if self.sink.acted {
                    self.pending = 0;
                } else {
                    self.pending += 1;
                    if self.pending > MAX_ESCAPE {
                        self.abandon();
                    }
                }
            }
            if newline {
                // Always start the next line afresh: a sequence can be unfinished even when the
                // parser just acted (an ESC that ends an OSC string dispatches it and leaves the
                // parser waiting for the byte after the ESC).
                self.abandon();
                self.sink.push('\n');
            }
        }
        std::mem::swap(&mut self.sink.out, out);
    }

    fn abandon(&mut self) {
        self.parser = Parser::default();
        self.pending = 0;
    }
}

impl Sink {
    fn push(&mut self, c: char) {
        match self.out.last_mut() {
            Some(last) if last.style == self.style => last.text.push(c),
            _ => self.out.push(Segment {
                text: c.to_string(),
                style: self.style,
            }),
        }
    }

    /// Applies the parameters of one SGR sequence.
    fn sgr(&mut self, params: &Params) {
        let params: Vec<&[u16]> = params.iter().collect();
        let mut st = self.style;
        let mut i = 0;
        while i < params.len() {
            let p = params[i];
            let fx = st.get_effects();
            match p[0] {
                0 => st = Style::new(),
                1 => st = st.effects(fx.insert(Effects::BOLD)),
                2 => st = st.effects(fx.insert(Effects::DIMMED)),
                3 => st = st.effects(fx.insert(Effects::ITALIC)),
                // `4:0` is "no underline"; other `4:n` are underline styles.
                4 => st = st.effects(fx.set(Effects::UNDERLINE, p.get(1) != Some(&0))),
                22 => st = st.effects(fx.remove(Effects::BOLD | Effects::DIMMED)),
                23 => st = st.effects(fx.remove(Effects::ITALIC)),
                24 => st = st.effects(fx.remove(Effects::UNDERLINE)),
                n @ 30..=37 => st = st.fg_color(Some(ansi(n - 30))),
                n @ 90..=97 => st = st.fg_color(Some(ansi(n - 90 + 8))),
                39 => st = st.fg_color(None),
                n @ 40..=47 => st = st.bg_color(Some(ansi(n - 40))),
                n @ 100..=107 => st = st.bg_color(Some(ansi(n - 100 + 8))),
                49 => st = st.bg_color(None),
                n @ (38 | 48) => {
                    let color = if p.len() > 1 {
                        // `38:5:n`, `38:2:r:g:b` or `38:2:colour-space:r:g:b`.
                        let args = &p[1..];
                        match args {
                            [2, _, r, g, b] => Some(rgb(*r, *g, *b)),
                            _ => extended(args).0,
                        }
                    } else {
                        // `38;5;n` or `38;2;r;g;b`: the arguments are the next parameters.
                        let args: Vec<u16> = params[i + 1..].iter().map(|a| a[0]).collect();
                        let (color, used) = extended(&args);
                        i += used;
                        color
                    };
                    if let Some(c) = color {
                        st = if n == 38 {
                            st.fg_color(Some(c))
                        } else {
                            st.bg_color(Some(c))
                        };
                    }
                }
                _ => {}
            }
            i += 1;
        }
        self.style = st;
    }
}

/// One of the 16 named colours, by its number (0–15).
fn ansi(index: u16) -> Color {
    let c = Ansi256Color(index as u8);
    c.into_ansi().map_or(Color::Ansi256(c), Color::Ansi)
}

fn rgb(r: u16, g: u16, b: u16) -> Color {
    let c = |v: u16| v.min(255) as u8;
    Color::Rgb(RgbColor(c(r), c(g), c(b)))
}

/// Reads `5, n` or `2, r, g, b` (the arguments of SGR 38/48); returns the colour and how many
/// arguments it took. Missing arguments count as 0, as in a terminal.
fn extended(args: &[u16]) -> (Option<Color>, usize) {
    let arg = |k: usize| args.get(k).copied().unwrap_or(0);
    match args.first() {
        Some(5) => {
            let n = arg(1);
            let color = u8::try_from(n)
                .ok()
                .map(|n| Color::Ansi256(Ansi256Color(n)));
            (color, 2.min(args.len()))
        }
        Some(2) => (Some(rgb(arg(1), arg(2), arg(3))), 4.min(args.len())),
        _ => (None, 0),
    }
}

impl Perform for Sink {
    fn print(&mut self, c: char) {
        self.acted = true;
        // DEL and the C1 controls arrive here; they have no picture.
        if !c.is_control() {
            self.push(c);
        }
    }

    fn execute(&mut self, byte: u8) {
        self.acted = true;
        if byte == b'\t' {
            self.push('\t');
        }
    }

    fn hook(&mut self, _: &Params, _: &[u8], _: bool, _: u8) {
        self.acted = true;
    }

    fn unhook(&mut self) {
        self.acted = true;
    }

    fn osc_dispatch(&mut self, _: &[&[u8]], _: bool) {
        self.acted = true;
    }

    fn csi_dispatch(&mut self, params: &Params, intermediates: &[u8], ignore: bool, action: u8) {
        self.acted = true;
        if action == b'm' && intermediates.is_empty() && !ignore {
            self.sgr(params);
        }
    }

    fn esc_dispatch(&mut self, _: &[u8], _: bool, _: u8) {
        self.acted = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(text: &str) -> Vec<Span> {
        Renderer::new()
            .render(text)
            .iter()
            .map(Span::from)
            .collect()
    }

    fn span(text: &str, class: &str) -> Span {
        Span {
            text: text.into(),
            class: class.into(),
            fg: None,
            bg: None,
        }
    }

    #[test]
    fn sgr_effects_and_reset() {
        assert_eq!(
            spans("a\x1b[1mb\x1b[2;3;4mc\x1b[22md\x1b[0me\x1b[1;4me\x1b[mf"),
            [
                span("a", ""),
                span("b", "b"),
                span("c", "b dim i u"),
                span("d", "i u"),
                span("e", ""),
                span("e", "b u"),
                span("f", ""),
            ]
        );
        assert_eq!(
            spans("\x1b[3;4mx\x1b[23;24my"),
            [span("x", "i u"), span("y", "")]
        );
    }

    #[test]
    fn named_colours() {
        assert_eq!(
            spans("\x1b[31mred\x1b[0m and \x1b[1mbold\x1b[0m"),
            [span("red", "fg-red"), span(" and ", ""), span("bold", "b")]
        );
        assert_eq!(
            spans("\x1b[92;44mx\x1b[39my\x1b[103;49mz"),
            [
                span("x", "fg-bright-green bg-blue"),
                span("y", "bg-blue"),
                span("z", ""),
            ]
        );
        assert_eq!(spans("\x1b[105mq"), [span("q", "bg-bright-magenta")]);
    }

    #[test]
    fn palette_and_truecolour() {
        let s = spans("\x1b[38;5;1ma\x1b[38;5;9mb\x1b[38;5;196mc\x1b[48;5;244md\x1b[0m");
        assert_eq!(s[0], span("a", "fg-red"));
        assert_eq!(s[1], span("b", "fg-bright-red"));
        assert_eq!(
            (s[2].class.as_str(), s[2].fg.as_deref()),
            ("", Some("rgb(255,0,0)"))
        );
        assert_eq!(s[3].fg.as_deref(), Some("rgb(255,0,0)"));
        assert_eq!(s[3].bg.as_deref(), Some("rgb(128,128,128)"));
        let s = spans("\x1b[38;2;10;20;30;1mx\x1b[48:2::1:2:3my\x1b[38:5:4mz");
        assert_eq!(s[0].fg.as_deref(), Some("rgb(10,20,30)"));
        assert_eq!(s[0].class, "b");
        assert_eq!(s[1].bg.as_deref(), Some("rgb(1,2,3)"));
        assert_eq!(s[2].class, "b fg-blue");
        assert_eq!(s[2].fg, None);
        // A named colour replaces an RGB one and the other way round.
        let s = spans("\x1b[38;2;1;1;1m\x1b[32mg\x1b[38;2;300;0;0mr");
        assert_eq!(s[0], span("g", "fg-green"));
        assert_eq!(
            (s[1].class.as_str(), s[1].fg.as_deref()),
            ("", Some("rgb(255,0,0)"))
        );
    }

    #[test]
    fn other_escapes_and_controls_are_dropped() {
        let text = "a\x1b[2K\x1b[1G\x1b]0;title\x07b\x1b]8;;http://x\x1b\\c\x1b(B\x1b[?25l\rd\te\x07\x08\x7f\u{9b}f";
        assert_eq!(spans(text), [span("abcd\tef", "")]);
        // Private-marker and intermediate-byte `m` sequences are not SGR.
        assert_eq!(spans("\x1b[>4;2mx\x1b[?1mx"), [span("xx", "")]);
    }

    #[test]
    fn an_escape_that_ends_an_osc_string_does_not_outlive_its_line() {
        // Found by the `ansi` fuzz target: the ESC ending the OSC dispatched it, so nothing looked
        // unfinished at the newline, and the next line's first character was taken as the
        // escape's final byte.
        let shown: String = Renderer::new()
            .render("docs\x1b]8;;\x1b\nST /invoke")
            .into_iter()
            .map(|s| s.text)
            .collect();
        assert_eq!(shown, "docs\nST /invoke");
    }

    #[test]
    fn text_and_newlines_are_kept() {
        let text = "línea €✓ <b>&amp;</b>\n\n\u{fffd}end";
        assert_eq!(spans(text), [span(text, "")]);
        // An unfinished sequence ends at a newline, which stays.
        assert_eq!(spans("a\x1b]0;x\nb\x1b[3\nc"), [span("a\nb\nc", "")]);
    }

    #[test]
    fn a_long_sequence_is_abandoned() {
        let osc = format!("\x1b]0;{}", "x".repeat(MAX_ESCAPE + 10));
        // The parser gives up at the byte after MAX_ESCAPE (the 4 bytes of `ESC ] 0 ;` count).
        let s = spans(&osc);
        assert_eq!(
            s,
            [span(
                &"x".repeat(MAX_ESCAPE + 10 - (MAX_ESCAPE + 1 - 4)),
                ""
            )]
        );
    }

    #[test]
    fn render_into_joins_segments_of_one_style() {
        let mut r = Renderer::new();
        let mut out = Vec::new();
        for piece in ["\x1b[1ma", "b\x1b", "[0", "mc", "d"] {
            r.render_into(piece, &mut out);
        }
        let spans: Vec<Span> = out.iter().map(Span::from).collect();
        assert_eq!(spans, [span("ab", "b"), span("cd", "")]);
    }

    /// Whatever the cuts, the segments (merged) are those of the text in one piece.
    #[test]
    fn cuts_anywhere_give_the_same_segments() {
        let text = "\x1b[1;31mred\x1b[0m é\x1b[38;2;1;2;3mrgb\x1b]8;;http://e\x07link\x1b]8;;\x07\r\n\x1b[48;5;200m€x\x1b[m";
        let whole = Renderer::new().render(text);
        let cuts: Vec<usize> = text.char_indices().map(|(i, _)| i).skip(1).collect();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b > a) {
                let mut r = Renderer::new();
                let mut got = Vec::new();
                for piece in [&text[..a], &text[a..b], &text[b..]] {
                    got.extend(r.render(piece));
                }
                assert_eq!(merge(got), whole, "cut at {a} and {b}");
            }
        }
    }

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
}
