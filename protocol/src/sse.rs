//! The live job log, `GET /api/v1/jobs/{id}/log/stream`, decoded from Server-Sent Events.
//!
//! The server sends `log` events whose `id` is the byte offset after the event and whose data is
//! `{"offset": N, "text": "..."}`, then one `end` event with `{"status", "exit_code", "log_size"}`.
//! A client that lost the connection reconnects with `Last-Event-ID: <offset>` and gets exactly
//! the bytes after that offset.
//! The SSE framing itself is parsed by `eventsource-stream`; this module only gives the events
//! their meaning.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use serde::Deserialize;

use crate::client::ClientError;
use crate::types::JobStatus;

/// How long a log stream may stay silent before its connection is presumed dead.
///
/// The server sends a keep-alive comment every 15 s, so three missed keep-alives mean the
/// connection is gone even when no TCP reset ever arrives (a dropped NAT entry, a sleeping
/// laptop).
pub const LOG_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// The longest one log stream request may last before it is cut and must be resumed.
///
/// Far longer than any reasonable job, yet finite: it also overrides a shorter total timeout of a
/// `reqwest::Client` passed to [`crate::Client::with_http`].
pub const LOG_STREAM_MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// One event of a job's live log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// Log text that starts at byte `offset` of the job's log.
    Text {
        /// Byte offset of the first byte of `text` in the job's log.
        offset: u64,
        /// Byte offset just after this event: where a reconnecting reader resumes.
        ///
        /// Usually `offset + text.len()`, but not when the log held bytes that are not UTF-8 and
        /// were shown as U+FFFD, so resume from this value, never from the text's length.
        next_offset: u64,
        /// The text.
        text: String,
    },
    /// The job ended; no more text follows.
    End {
        /// The job's final status.
        status: JobStatus,
        /// The exit code the runner reported, if any.
        exit_code: Option<i32>,
        /// The size of the whole log in bytes.
        log_size: u64,
    },
}

#[derive(Deserialize)]
struct LogData {
    offset: u64,
    text: String,
}

#[derive(Deserialize)]
struct EndData {
    status: JobStatus,
    exit_code: Option<i32>,
    log_size: u64,
}

#[derive(Deserialize)]
struct ErrorData {
    message: String,
}

/// A stream of log events, boxed so that callers can keep it in a struct or a loop.
pub type LogEventStream = Pin<Box<dyn Stream<Item = Result<LogEvent, ClientError>> + Send>>;

fn decode_error(what: &str, err: impl std::fmt::Display) -> ClientError {
    ClientError::Decode(format!("bad `{what}` event in the log stream: {err}"))
}

/// Gives one SSE event its meaning; `Ok(None)` for events this client does not know.
fn interpret(event: &Event) -> Result<Option<LogEvent>, ClientError> {
    match event.event.as_str() {
        "log" => {
            let data: LogData =
                serde_json::from_str(&event.data).map_err(|e| decode_error("log", e))?;
            let next_offset =
                event.id.trim().parse::<u64>().map_err(|_| {
                    decode_error("log", format!("its id {:?} is no offset", event.id))
                })?;
            if next_offset < data.offset {
                return Err(decode_error(
                    "log",
                    format!("it ends at {next_offset}, before its start {}", data.offset),
                ));
            }
            Ok(Some(LogEvent::Text {
                offset: data.offset,
                next_offset,
                text: data.text,
            }))
        }
        "end" => {
            let data: EndData =
                serde_json::from_str(&event.data).map_err(|e| decode_error("end", e))?;
            Ok(Some(LogEvent::End {
                status: data.status,
                exit_code: data.exit_code,
                log_size: data.log_size,
            }))
        }
        // The server could not read the log (its database, say); the event asks the client to
        // reconnect, so it is reported as a transient server-side failure.
        "error" => {
            let message = serde_json::from_str::<ErrorData>(&event.data)
                .map(|d| d.message)
                .unwrap_or_else(|_| event.data.clone());
            Err(ClientError::Api {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "log_stream_failed".to_string(),
                message,
                next_offset: None,
            })
        }
        _ => Ok(None),
    }
}

/// Ends `bytes` quietly when no bytes arrive for `idle`, as if the connection had closed.
fn end_when_idle<S>(bytes: S, idle: Duration) -> impl Stream<Item = S::Item> + Send
where
    S: Stream + Send + 'static,
    S::Item: Send,
{
    futures::stream::unfold(Some(Box::pin(bytes)), move |state| async move {
        let mut bytes = state?;
        match tokio::time::timeout(idle, bytes.next()).await {
            Ok(Some(item)) => Some((item, Some(bytes))),
            Ok(None) | Err(_) => None,
        }
    })
}

/// Decodes the body of a log stream into [`LogEvent`]s.
///
/// The stream ends after the `end` event.
/// It also ends, without an `end` event, when the connection closes early or stays silent for
/// `idle`; the reader then reconnects from the last `next_offset` it saw.
/// An event cut off by a dropped connection is never yielded, so no partial text escapes.
pub fn decode_log_stream<S>(bytes: S, idle: Duration) -> LogEventStream
where
    S: Stream<Item = Result<Bytes, ClientError>> + Send + 'static,
{
    let events = end_when_idle(bytes, idle).eventsource();
    let decoded = futures::stream::unfold(
        (Box::pin(events), false),
        |(mut events, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let item = match events.next().await? {
                    Ok(event) => match interpret(&event) {
                        Ok(Some(ev)) => Ok(ev),
                        Ok(None) => continue,
                        Err(e) => Err(e),
                    },
                    Err(EventStreamError::Transport(e)) => Err(e),
                    Err(EventStreamError::Utf8(e)) => Err(ClientError::Decode(format!(
                        "the log stream is not UTF-8: {e}"
                    ))),
                    Err(EventStreamError::Parser(e)) => Err(ClientError::Decode(format!(
                        "the log stream is not valid Server-Sent Events: {e}"
                    ))),
                };
                let ended = matches!(item, Ok(LogEvent::End { .. }));
                return Some((item, (events, ended)));
            }
        },
    );
    Box::pin(decoded)
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;

    use super::*;

    fn chunks(parts: &[&str]) -> impl Stream<Item = Result<Bytes, ClientError>> + Send + 'static {
        let owned: Vec<Result<Bytes, ClientError>> = parts
            .iter()
            .map(|p| Ok(Bytes::from(p.as_bytes().to_vec())))
            .collect();
        futures::stream::iter(owned)
    }

    async fn decode(parts: &[&str]) -> Vec<Result<LogEvent, ClientError>> {
        decode_log_stream(chunks(parts), Duration::from_secs(5))
            .collect()
            .await
    }

    const WIRE: &str = "event: log\nid: 6\ndata: {\"offset\":0,\"text\":\"hello\\n\"}\n\n\
                        :\n\n\
                        event: log\nid: 13\ndata: {\"offset\":6,\"text\":\"w\u{20ac}rld\\n\"}\n\n\
                        event: end\nid: 13\ndata: {\"status\":\"failed\",\"exit_code\":3,\"log_size\":13}\n\n";

    #[tokio::test]
    async fn decodes_text_then_end() {
        let events: Vec<LogEvent> = decode_log_stream(chunks(&[WIRE]), Duration::from_secs(5))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            events,
            vec![
                LogEvent::Text {
                    offset: 0,
                    next_offset: 6,
                    text: "hello\n".into()
                },
                LogEvent::Text {
                    offset: 6,
                    next_offset: 13,
                    text: "w\u{20ac}rld\n".into()
                },
                LogEvent::End {
                    status: JobStatus::Failed,
                    exit_code: Some(3),
                    log_size: 13
                },
            ]
        );
    }

    #[tokio::test]
    async fn survives_any_split_of_the_bytes() {
        let whole = WIRE.as_bytes();
        let expected: Vec<LogEvent> = decode_log_stream(chunks(&[WIRE]), Duration::from_secs(5))
            .try_collect()
            .await
            .unwrap();
        for cut in 1..whole.len() {
            let (a, b) = whole.split_at(cut);
            let parts = vec![Ok(Bytes::copy_from_slice(a)), Ok(Bytes::copy_from_slice(b))];
            let got: Vec<LogEvent> =
                decode_log_stream(futures::stream::iter(parts), Duration::from_secs(5))
                    .try_collect()
                    .await
                    .unwrap_or_else(|e| panic!("split at byte {cut}: {e}"));
            assert_eq!(got, expected, "split at byte {cut}");
        }
    }

    #[tokio::test]
    async fn a_cut_off_event_is_not_yielded() {
        // The connection drops inside the second event: only the first one is whole.
        let cut = WIRE.find("event: log\nid: 13").unwrap() + 30;
        let events = decode(&[&WIRE[..cut]]).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(matches!(
            events[0],
            Ok(LogEvent::Text { next_offset: 6, .. })
        ));
    }

    #[tokio::test]
    async fn nothing_after_the_end_event() {
        let wire =
            format!("{WIRE}event: log\nid: 20\ndata: {{\"offset\":13,\"text\":\"late\"}}\n\n");
        let events = decode(&[&wire]).await;
        assert_eq!(events.len(), 3);
        assert!(matches!(events[2], Ok(LogEvent::End { .. })));
    }

    #[tokio::test]
    async fn server_error_event_is_transient() {
        let events = decode(&[
            "event: error\ndata: {\"message\":\"the log could not be read; reconnect to resume\"}\n\n",
        ])
        .await;
        let err = events[0].as_ref().unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("reconnect to resume"));
    }

    #[tokio::test]
    async fn a_log_event_without_an_offset_id_is_an_error() {
        let events = decode(&["event: log\ndata: {\"offset\":0,\"text\":\"x\"}\n\n"]).await;
        assert!(matches!(events[0], Err(ClientError::Decode(_))));
    }

    #[tokio::test]
    async fn unknown_events_are_skipped() {
        let events = decode(&[
            "event: progress\ndata: {}\n\n",
            "data: plain message\n\n",
            "event: end\ndata: {\"status\":\"succeeded\",\"exit_code\":null,\"log_size\":0}\n\n",
        ])
        .await;
        assert_eq!(events.len(), 1);
        assert!(matches!(
            events[0],
            Ok(LogEvent::End {
                status: JobStatus::Succeeded,
                exit_code: None,
                log_size: 0
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_ends_the_stream() {
        let first = futures::stream::iter(vec![Ok(Bytes::from_static(
            b"event: log\nid: 1\ndata: {\"offset\":0,\"text\":\"a\"}\n\n",
        ))]);
        // Then nothing, ever: as a half-open TCP connection would behave.
        let silent = first.chain(futures::stream::pending());
        let events: Vec<_> = decode_log_stream(silent, LOG_STREAM_IDLE_TIMEOUT)
            .collect()
            .await;
        assert_eq!(events.len(), 1);
    }
}
