//! What the CLI prints: aligned tables, ages, JSON, and writes that survive a closed pipe.

use std::io::Write;

use chrono::{DateTime, Utc};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns and plain sentences, for people.
    Table,
    /// JSON as the API returns it; live logs as one JSON object per line.
    Json,
}

/// Writes `text` to stdout and flushes, so that live log text shows at once.
///
/// Unlike `print!`, a closed pipe (`outpost logs ID | head`) is an error to return, not a panic.
pub fn out(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// Writes raw bytes (a stored log, which need not be UTF-8) to stdout.
pub fn out_bytes(bytes: &[u8]) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()
}

/// Writes `line` and a newline to stdout.
pub fn outln(line: &str) -> std::io::Result<()> {
    out(&format!("{line}\n"))
}

/// Prints `value` as pretty JSON on stdout.
pub fn json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    outln(&text)?;
    Ok(())
}

/// Prints `value` as one compact JSON line on stdout (for streams of events).
pub fn json_line(value: &serde_json::Value) -> std::io::Result<()> {
    outln(&value.to_string())
}

/// A table with a header row, printed with columns padded to their widest cell.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; it must have one cell per header.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    /// The table as text, one line per row, with no trailing spaces.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut text = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < row.len() {
                    let pad = w - cell.chars().count();
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    /// Prints the table on stdout.
    pub fn print(&self) -> std::io::Result<()> {
        out(&self.render())
    }
}

/// How long ago `then` was, in the largest whole unit: `42s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn ago(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - then).num_seconds().max(0);
    let (n, unit) = match secs {
        0..60 => (secs, "s"),
        60..3600 => (secs / 60, "m"),
        3600..86_400 => (secs / 3600, "h"),
        _ => (secs / 86_400, "d"),
    };
    format!("{n}{unit} ago")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_line_up() {
        let mut t = Table::new(&["NAME", "STATE"]);
        t.row(vec!["a-long-name".into(), "idle".into()]);
        t.row(vec!["b".into(), "busy".into()]);
        assert_eq!(
            t.render(),
            "NAME         STATE\na-long-name  idle\nb            busy\n"
        );
    }

    #[test]
    fn no_trailing_spaces_for_empty_last_cells() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["x".into(), String::new()]);
        assert!(t.render().lines().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn ages_use_the_largest_whole_unit() {
        let now = Utc::now();
        assert_eq!(ago(now - chrono::Duration::seconds(5), now), "5s ago");
        assert_eq!(ago(now - chrono::Duration::seconds(125), now), "2m ago");
        assert_eq!(ago(now - chrono::Duration::hours(3), now), "3h ago");
        assert_eq!(ago(now - chrono::Duration::days(9), now), "9d ago");
        // A clock slightly ahead of ours is not "in the future".
        assert_eq!(ago(now + chrono::Duration::seconds(2), now), "0s ago");
    }
}
