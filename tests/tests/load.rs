//! A small run of the load scenario (`src/bin/load.rs`), so that the suite keeps it working; the
//! full run (1,000 viewers, 100 runners, 60 s) is a command run by hand, see the binary's docs.

use std::process::Command;

#[test]
fn small_load_run_has_no_error_and_every_viewer_sees_every_byte() {
    let out = Command::new(env!("CARGO_BIN_EXE_load"))
        .args(["--viewers", "40", "--runners", "4", "--secs", "3"])
        .args(["--backend", "sqlite", "--max-rss-mib", "256"])
        .output()
        .expect("the load binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the load run failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let figures = stdout
        .lines()
        .find(|l| l.starts_with("load: figures"))
        .unwrap_or_else(|| panic!("no figures line:\n{stdout}"));
    assert!(figures.contains(" errors=0 "), "{figures}");
    assert!(figures.contains(" viewers_complete=40 "), "{figures}");
    assert!(figures.contains(" viewers_short=0 "), "{figures}");
}
