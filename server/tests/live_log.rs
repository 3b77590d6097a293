//! The live log (`GET /api/v1/jobs/{id}/log/stream`) with many viewers of one job, on SQLite and
//! PostgreSQL, over a real TCP listener: every viewer gets exactly the bytes the runner appended
//! (history longer than the shared tail, live appends that cut characters, resumes from an
//! offset), then the end event; and the job's shared feed is freed once the viewers are gone.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::PgDb;
use futures::StreamExt;
use outpost_protocol::sse::LogEvent;
use outpost_protocol::{Client, CompleteRequest, JobStatus, RegisterRequest};
use outpost_server::api::{AppState, router};
use outpost_server::store::Scope;
use outpost_server::{Settings, Store, pipeline};
use tokio_util::sync::CancellationToken;

const PIPELINE: &str = "jobs:\n  build:\n    runs_on: [x]\n    steps:\n      - run: 'true'\n";

/// Viewers that start at byte 0 while the job runs.
const VIEWERS: usize = 40;

/// Log text with multi-byte characters, so that appends cut characters.
fn line(i: usize) -> String {
    format!("línea {i:06} – déploiement €✓ {}\n", "x".repeat(i % 37))
}

async fn many_viewers_see_the_whole_log(store: Arc<Store>, data_dir: &std::path::Path) {
    let settings = Settings {
        data_dir: data_dir.to_path_buf(),
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let app = router(AppState {
        store: store.clone(),
        settings: Arc::new(settings),
        shutdown: shutdown.clone(),
        entra: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
                .unwrap()
        }
    });

    let def = pipeline::parse(PIPELINE).unwrap();
    store.put_pipeline("live", PIPELINE, &def).await.unwrap();
    let (_, read) = store
        .create_api_token("viewer", Scope::Read, None)
        .await
        .unwrap();
    let req: RegisterRequest =
        serde_json::from_value(serde_json::json!({ "name": "r", "labels": ["x"] })).unwrap();
    let reg = store.register_runner("default", &req).await.unwrap();
    store
        .create_run(
            outpost_server::store::NewRun {
                pipeline: "live".into(),
                trigger: Default::default(),
                variables: Default::default(),
            },
            &def,
        )
        .await
        .unwrap();
    let runner = Client::new(&base, Some(reg.runner_token)).unwrap();
    let claim = runner
        .acquire(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("the job is handed out");
    let (job, lease) = (claim.job.id, claim.lease.token);

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

    shutdown.cancel();
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_viewers_see_the_whole_log_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/outpost.db", dir.path().display());
    let store = Arc::new(Store::connect(&url, 4).await.unwrap());
    many_viewers_see_the_whole_log(store, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_viewers_see_the_whole_log_postgres() {
    let Some(db) = PgDb::new("outpost_live_log").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::connect(&db.url, 8).await.unwrap());
    many_viewers_see_the_whole_log(store.clone(), dir.path()).await;
    store.close().await;
}
