//! The live log's opt-in rendering (`GET /api/v1/jobs/{id}/log/stream?format=spans`), on SQLite
//! and PostgreSQL, over a real TCP listener: each `log` event carries the same `offset`, `text` and
//! `id` as without the parameter, plus the text rendered as styled spans, the style carrying from
//! one event to the next though the appends cut escape sequences; the plain stream has no spans;
//! `?to=` stops the stream at a byte offset.

#[path = "common/claimed_job.rs"]
mod claimed_job;
#[macro_use]
mod common;

use std::time::Duration;

use bytes::Bytes;
use claimed_job::ClaimedJob;
use common::Backend;
use outpost_protocol::{CompleteRequest, JobStatus};
use outpost_server::ansi::{Renderer, Span};
use serde_json::Value;

/// Coloured output as `ls --color`, `git log --color` and a progress bar write it.
const LOG: &str = "\x1b[0m\x1b[01;34mdir\x1b[0m  \x1b[01;32mrun.sh\x1b[0m\n\
    \x1b[33mcommit 1a2b3c\x1b[m\x1b[33m (\x1b[m\x1b[1;36mHEAD -> \x1b[m\x1b[1;32mmain\x1b[m\x1b[33m)\x1b[m\n\
    \x1b[31mred text\x1b[0m and \x1b[1mbold text\x1b[0m\n\
    \x1b[38;5;208mpalette\x1b[0m \x1b[38;2;255;128;0;48;5;17mtruecolour\x1b[0m é€\n\
    \x1b[2K\r 50% \x1b]0;title\x07\x1b[2K\r100% done\n";

/// One SSE event: its name, `id` and data.
type SseEvent = (String, Option<String>, Value);

/// Reads a whole (finite) stream and splits it into events.
async fn events(http: &reqwest::Client, url: &str, token: &str) -> Vec<SseEvent> {
    let resp = http.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{url}");
    let body = tokio::time::timeout(Duration::from_secs(30), resp.text())
        .await
        .expect("the stream ends within 30 s")
        .unwrap();
    body.split("\n\n")
        .filter_map(|block| {
            let (mut name, mut id, mut data) = (None, None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(v.trim()).unwrap());
                }
            }
            Some((name?, id, data?))
        })
        .collect()
}

/// Joins neighbouring spans of one style, so that renderings cut differently compare equal.
fn merge(spans: impl IntoIterator<Item = Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for mut s in spans {
        let text = s["text"].as_str().unwrap().to_owned();
        s["text"] = Value::Null;
        match out.last_mut() {
            Some(last)
                if {
                    let mut l = last.clone();
                    l["text"] = Value::Null;
                    l == s
                } =>
            {
                let joined = format!("{}{text}", last["text"].as_str().unwrap());
                last["text"] = joined.into();
            }
            _ => {
                s["text"] = text.into();
                out.push(s);
            }
        }
    }
    out
}

async fn spans_ride_along_the_plain_stream(backend: Backend) {
    let db = test_db!(backend);
    let set = ClaimedJob::start(&db, "spans").await;
    let (base, runner, read) = (set.base.clone(), set.runner.clone(), set.read.clone());
    let (job, lease) = (set.job, set.lease.clone());

    // More than the shared tail keeps (256 KiB), so that the stream reads the history a page
    // (8 chunks) at a time, in several events; appends of 997 bytes cut escapes and characters.
    let log = LOG.repeat(300 * 1024 / LOG.len() + 1);
    for (i, piece) in log.as_bytes().chunks(997).enumerate() {
        runner
            .append_log(job, &lease, (i * 997) as u64, Bytes::copy_from_slice(piece))
            .await
            .unwrap();
    }
    runner
        .complete(
            job,
            &lease,
            &CompleteRequest {
                status: JobStatus::Succeeded,
                exit_code: Some(0),
            },
        )
        .await
        .unwrap();

    let http = reqwest::Client::new();
    let url = format!("{base}/api/v1/jobs/{job}/log/stream");
    let plain = events(&http, &url, &read).await;
    let spans = events(&http, &format!("{url}?format=spans"), &read).await;

    // The plain stream: `{offset, text}` only, the whole log, then the end.
    assert!(plain.len() > 3, "the log comes in several events");
    let mut text = String::new();
    for (name, id, data) in &plain[..plain.len() - 1] {
        assert_eq!(name, "log");
        let keys: Vec<&str> = data
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys, ["offset", "text"], "a plain event has no spans");
        assert_eq!(data["offset"], text.len() as u64);
        text.push_str(data["text"].as_str().unwrap());
        assert_eq!(id.as_deref(), Some(text.len().to_string().as_str()));
    }
    assert_eq!(text, log);
    assert_eq!(plain.last().unwrap().0, "end");

    // With spans: the same events, each with its spans added.
    assert_eq!(spans.len(), plain.len());
    let mut rendered = Vec::new();
    for ((name, id, data), (pname, pid, pdata)) in spans.iter().zip(&plain) {
        assert_eq!((name, id), (pname, pid));
        let mut without = data.clone();
        if name == "log" {
            rendered.extend(without["spans"].as_array().unwrap().iter().cloned());
            without.as_object_mut().unwrap().remove("spans");
        }
        assert_eq!(&without, pdata);
    }
    let whole: Vec<Value> = Renderer::new()
        .render(&log)
        .iter()
        .map(|s| serde_json::to_value(Span::from(s)).unwrap())
        .collect();
    let rendered = merge(rendered);
    assert_eq!(rendered, whole, "the style carries across events");
    let find = |t: &str| {
        rendered
            .iter()
            .find(|s| s["text"] == t)
            .unwrap_or_else(|| panic!("a span {t:?} in {rendered:?}"))
            .clone()
    };
    assert_eq!(
        find("red text"),
        serde_json::json!({ "text": "red text", "class": "fg-red" })
    );
    assert_eq!(
        find("main"),
        serde_json::json!({ "text": "main", "class": "b fg-green" })
    );
    assert_eq!(find("palette")["fg"], "rgb(255,135,0)");
    assert_eq!(
        find("truecolour"),
        serde_json::json!({ "text": "truecolour", "fg": "rgb(255,128,0)", "bg": "rgb(0,0,95)" })
    );
    let shown: String = rendered
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        shown,
        "dir  run.sh\ncommit 1a2b3c (HEAD -> main)\nred text and bold text\n\
         palette truecolour é€\n 50% 100% done\n"
            .repeat(log.len() / LOG.len())
    );

    // `to` stops at a byte offset, with no end event; `offset` starts in the default style.
    let from = LOG.find("\x1b[31m").unwrap() + 3;
    let to = LOG.find("palette").unwrap();
    let part = events(
        &http,
        &format!("{url}?format=spans&offset={from}&to={to}"),
        &read,
    )
    .await;
    assert!(part.iter().all(|(name, ..)| name == "log"), "{part:?}");
    let text: String = part
        .iter()
        .map(|(_, _, d)| d["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, LOG[from..to]);
    assert_eq!(
        part.last().unwrap().1.as_deref(),
        Some(to.to_string().as_str())
    );
    let spans = merge(
        part.iter()
            .flat_map(|(_, _, d)| d["spans"].as_array().unwrap().clone()),
    );
    assert_eq!(spans[0], serde_json::json!({ "text": "1mred text and " }));

    // An unknown format is refused.
    let resp = http
        .get(format!("{url}?format=html"))
        .bearer_auth(&read)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    set.stop().await;
}

backend_tests!(multi_thread: spans_ride_along_the_plain_stream);
