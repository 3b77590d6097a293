//! The live log (`GET /api/v1/jobs/{id}/log/stream`) with many viewers of one job, on SQLite and
//! PostgreSQL, over a real TCP listener: every viewer gets exactly the bytes the runner appended
//! (history longer than the shared tail, live appends that cut characters, resumes from an
//! offset), then the end event; and the job's shared feed is freed once the viewers are gone.

#[path = "common/claimed_job.rs"]
mod claimed_job;
#[macro_use]
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use claimed_job::ClaimedJob;
use common::Backend;
use futures::StreamExt;
use outpost_protocol::sse::LogEvent;
use outpost_protocol::{Client, CompleteRequest, JobStatus};

/// Viewers that start at byte 0 while the job runs.
const VIEWERS: usize = 40;

/// Log text with multi-byte characters, so that appends cut characters.
fn line(i: usize) -> String {
    format!("línea {i:06} – déploiement €✓ {}\n", "x".repeat(i % 37))
}

async fn many_viewers_see_the_whole_log(backend: Backend) {
    let db = test_db!(backend);
    let set = ClaimedJob::start(&db, "live").await;
    let store = set.store.clone();
    let (base, runner, read) = (set.base.clone(), set.runner.clone(), set.read.clone());
    let (job, lease) = (set.job, set.lease.clone());

    // The whole log, appended in pieces that cut lines and characters.
    let text: String = (0..12_000).map(line).collect();
    let bytes = text.as_bytes();
    // More history than the shared tail keeps (256 KiB), so late viewers read some from the database.
    let history = 300 * 1024;
    let mut offset = 0usize;
    let mut append = async |upto: usize, piece: usize| {
        while offset < upto {
            let end = (offset + piece).min(upto);
            let ack = runner
                .append_log(
                    job,
                    &lease,
                    offset as u64,
                    Bytes::copy_from_slice(&bytes[offset..end]),
                )
                .await
                .unwrap();
            assert_eq!(ack.next_offset, end as u64);
            offset = end;
        }
    };
    append(history, 7_001).await;

    let viewers_client = Client::new(&base, Some(read)).unwrap();
    // Resume points: the start, inside the history but before the tail, and inside the tail.
    let starts: Vec<u64> = (0..VIEWERS)
        .map(|_| 0)
        .chain([
            text[..10_000].len() as u64,
            text.char_indices()
                .map(|(i, _)| i)
                .find(|&i| i >= history - 1_000)
                .unwrap() as u64,
        ])
        .collect();
    let viewers: Vec<_> = starts
        .iter()
        .map(|&from| {
            let mut stream = viewers_client.stream_log(job, from);
            tokio::spawn(async move {
                let mut got = String::new();
                let mut next = from;
                loop {
                    let ev = tokio::time::timeout(Duration::from_secs(30), stream.next())
                        .await
                        .expect("an event within 30 s")
                        .expect("the stream goes on until the end event")
                        .expect("no stream error");
                    match ev {
                        LogEvent::Text {
                            offset,
                            next_offset,
                            text,
                        } => {
                            assert_eq!(offset, next, "events follow each other without a gap");
                            next = next_offset;
                            got.push_str(&text);
                        }
                        LogEvent::End {
                            status, log_size, ..
                        } => return (from, got, status, log_size),
                    }
                }
            })
        })
        .collect();

    // Live appends while the viewers watch, then the end.
    append(bytes.len(), 4_093).await;
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

    for v in viewers {
        let (from, got, status, log_size) = v.await.unwrap();
        assert_eq!(status, JobStatus::Succeeded);
        assert_eq!(log_size, bytes.len() as u64);
        assert!(
            got == text[from as usize..],
            "the viewer from byte {from} saw {} bytes, not the {} after its start",
            got.len(),
            text.len() - from as usize
        );
    }

    // Every viewer has gone: the job's feed and its tail are freed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.events.log_feeds() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} log feeds are still held 10 s after the last viewer left",
            store.events.log_feeds()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    set.stop().await;
}

backend_tests!(multi_thread: many_viewers_see_the_whole_log);
