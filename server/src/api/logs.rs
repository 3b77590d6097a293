//! Reading job logs: the whole log (with `Range: bytes=N-`) and the live Server-Sent Events stream.
//!
//! Both stream from the database a few chunks at a time, so memory stays bounded whatever the
//! log's size.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as HttpBody;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::Stream;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::extract::{Caller, parse_id};
use super::{ApiError, ApiResult, AppState};
use crate::ansi::{Renderer, Span};
use crate::events::SharedTail;
use crate::store::{Scope, Store};
use outpost_protocol::ErrorBody;
use outpost_protocol::JobStatus;

/// Chunks read from the database per page.
const PAGE_CHUNKS: u32 = 8;

/// One event of the log stream, as the OpenAPI document describes it (the handler builds them
/// with axum's `Event`; this type exists only for the schema).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct LogStreamEvent {
    /// `log`, `end` or `error`.
    #[schema(pattern = "^(log|end|error)$")]
    event: String,
    /// JSON: `{"offset", "text"}` for `log` (and `"spans"` with `?format=spans`: see
    /// [`LogSpans`]), `{"status", "exit_code", "log_size"}` for `end`, `{"message"}` for `error`.
    data: String,
    /// The byte offset after this event, to send back as `Last-Event-ID`.
    id: Option<String>,
    /// A reconnection delay in milliseconds, if the server sets one.
    retry: Option<u64>,
}

/// The data of a `log` event under `?format=spans`, as the OpenAPI document describes it.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(super) struct LogSpans {
    /// The byte offset of the event's first byte.
    offset: u64,
    /// The log text as it is, escapes included.
    text: String,
    /// The same text rendered: escape sequences and control characters other than `\n` and `\t`
    /// removed, ANSI SGR styles as classes and colours.
    /// A stream starts in the default style, also when it resumes from an offset.
    spans: Vec<Span>,
}

/// Parses `bytes=N-` (the only form a log reader needs); other forms are ignored.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(header::RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes=")?;
    let (start, end) = rest.split_once('-')?;
    if !end.trim().is_empty() {
        return None;
    }
    start.trim().parse().ok()
}

/// Streams the stored log from `from` to `to` (exclusive), page by page.
fn log_body(store: Arc<Store>, job: Uuid, from: u64, to: u64) -> HttpBody {
    let stream = futures::stream::unfold(from, move |offset| {
        let store = store.clone();
        async move {
            if offset >= to {
                return None;
            }
            match store.read_log(job, offset, PAGE_CHUNKS).await {
                Ok(chunks) => {
                    let mut buf = Vec::new();
                    let next = copy_range(&chunks, offset, to, &mut buf);
                    // Nothing copied: the log ends here (or has a gap, which a stored log never
                    // has); reading the same page again would copy nothing again.
                    if next == offset {
                        return None;
                    }
                    Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), next))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), to)),
            }
        }
    });
    HttpBody::from_stream(stream)
}

/// `GET /jobs/{id}/log`: the log as `text/plain`; `Range: bytes=N-` answers `206` with the tail.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}/log",
    tag = "runs",
    operation_id = "get_job_log",
    summary = "The job log as text; `Range: bytes=N-` gives the tail (read)",
    params(("id" = String, Path, description = "The job's id (UUID)"), ("Range" = Option<String>, Header, description = "`bytes=N-`")),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "The whole log", body = String, content_type = "text/plain"),
        (status = 206, description = "The log from the requested offset", body = String, content_type = "text/plain"),
        (status = 416, description = "The offset is past the end of the log"),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
    )
)]
pub async fn get_log(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    caller.require(Scope::Read)?;
    let id = parse_id(&id, "job")?;
    let (_, size) = state.store.job_log_state(id).await?;
    let start = range_start(&headers);
    let mut resp = match start {
        Some(n) if n >= size && !(n == 0 && size == 0) => {
            let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return Ok(r);
        }
        Some(n) if n > 0 => {
            let mut r = Response::new(log_body(state.store.clone(), id, n, size));
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {n}-{}/{size}", size - 1)).expect("ascii"),
            );
            r
        }
        _ => Response::new(log_body(state.store.clone(), id, 0, size)),
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    offset: Option<u64>,
    /// `spans` adds the rendered text to each `log` event; `text` (the default) does not.
    format: Option<String>,
    /// A byte offset to stop at: the stream ends after the event that reaches it.
    to: Option<u64>,
}

struct StreamState {
    store: Arc<Store>,
    job: Uuid,
    /// Bytes consumed so far (the `id` of the last event sent).
    offset: u64,
    /// Bytes read but held back because they end inside a UTF-8 character.
    carry: Vec<u8>,
    /// With `?format=spans`, the ANSI renderer, whose style carries from one event to the next.
    ansi: Option<Renderer>,
    /// With `?to=`, where the stream stops.
    to: Option<u64>,
    rx: watch::Receiver<u64>,
    /// The end of the log, shared with this process's other viewers of the job.
    tail: SharedTail,
    pending: VecDeque<Event>,
    done: bool,
    shutdown: CancellationToken,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        // Let go of the feed first, so the hub sees nobody left and frees the job's tail.
        drop(std::mem::replace(&mut self.rx, watch::channel(0).1));
        self.store.events.unsubscribe_log(self.job);
    }
}

/// How much of the end of a log the shared tail keeps: viewers that keep up read only from it.
const TAIL_WINDOW: u64 = 256 * 1024;
/// How old a tail may be when a viewer re-checks without a wake-up (a missed notification).
const TAIL_RECHECK: Duration = Duration::from_secs(5);
/// How long a viewer waits for a wake-up before re-checking anyway.
const STREAM_RECHECK: Duration = Duration::from_secs(10);

/// Appends to `out` the bytes of `chunks` (in log order) from offset `from` up to offset `to`
/// (exclusive), stopping at the first gap; returns the offset after the last byte copied.
///
/// The whole log (`GET …/log`) passes its size as `to`; the live log passes `u64::MAX`.
fn copy_range(chunks: &[crate::store::LogChunk], from: u64, to: u64, out: &mut Vec<u8>) -> u64 {
    let mut next = from;
    for c in chunks {
        let start = c.start_offset.max(0) as u64;
        let end = (start + c.data.len() as u64).min(to);
        if end <= next || start > next {
            continue;
        }
        out.extend_from_slice(&c.data[(next - start) as usize..(end - start) as usize]);
        next = end;
    }
    next
}

/// Brings `tail` up to date with wake-up `version` and copies what it holds from byte `from`
/// into `out`.
///
/// The first viewer to find the tail older than its wake-up reads the database, holding the
/// tail's lock; the others wait for it and then copy, so an append costs one read however many
/// viewers watch. With `recheck`, a tail older than [`TAIL_RECHECK`] is read again even without a
/// newer wake-up. Returns the job's status and log size as last read, and whether `from` was
/// inside the tail (when it is not, the viewer is behind and reads the database itself).
async fn read_tail(
    store: &Store,
    job: Uuid,
    tail: &SharedTail,
    version: u64,
    recheck: bool,
    from: u64,
    out: &mut Vec<u8>,
) -> Result<(JobStatus, u64, bool), ApiError> {
    let mut t = tail.lock().await;
    let stale = !t.loaded
        || t.version < version
        || (recheck && t.read_at.is_none_or(|at| at.elapsed() >= TAIL_RECHECK));
    if stale {
        let (status, size) = store.job_log_state(job).await?;
        let end = t.start + t.bytes.len() as u64;
        if size < end {
            // Logs only grow; start again rather than serve bytes the database no longer has.
            t.bytes.clear();
            t.start = size;
        } else if size > end {
            let begin = end.max(size.saturating_sub(TAIL_WINDOW));
            if begin > end {
                t.bytes.clear();
                t.start = begin;
            }
            let mut next = begin;
            while next < size {
                let chunks = store.read_log(job, next, PAGE_CHUNKS).await?;
                let copied_to = copy_range(&chunks, next, u64::MAX, &mut t.bytes);
                if copied_to == next {
                    // Nothing more (or a gap, which a stored log never has): stop here.
                    break;
                }
                next = copied_to;
            }
            let excess = (t.bytes.len() as u64).saturating_sub(TAIL_WINDOW) as usize;
            if excess > 0 {
                t.bytes.drain(..excess);
                t.start += excess as u64;
            }
        }
        t.status = Some(status);
        t.size = size.max(t.start + t.bytes.len() as u64);
        t.version = t.version.max(version);
        t.loaded = true;
        t.read_at = Some(std::time::Instant::now());
    }
    let status = t.status.expect("a loaded tail has a status");
    let end = t.start + t.bytes.len() as u64;
    let inside = from >= t.start;
    if inside && from < end {
        out.extend_from_slice(&t.bytes[(from - t.start) as usize..]);
    }
    Ok((status, t.size, inside))
}

/// Turns bytes into text without splitting a UTF-8 character: returns the text and leaves an
/// incomplete trailing character in `carry`. Invalid bytes become U+FFFD.
///
/// Public (but hidden) so that the `log_text` fuzz target in `fuzz/` can reach it.
#[doc(hidden)]
pub fn take_text(carry: &mut Vec<u8>, flush: bool) -> String {
    let bytes = std::mem::take(carry);
    let mut text = String::with_capacity(bytes.len());
    let mut rest = bytes.as_slice();
    // Invalid sequences become U+FFFD one by one, exactly as one lossy decoding of the whole log
    // would make them; only an incomplete character at the very end waits for the next read
    // (decoding the whole buffer lossily at the first invalid byte would also replace a
    // character that the next read completes).
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                text.push_str(s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                text.push_str(&String::from_utf8_lossy(good));
                match e.error_len() {
                    Some(n) => {
                        text.push(char::REPLACEMENT_CHARACTER);
                        rest = &bad[n..];
                    }
                    None if flush => {
                        text.push(char::REPLACEMENT_CHARACTER);
                        break;
                    }
                    None => {
                        *carry = bad.to_vec();
                        break;
                    }
                }
            }
        }
    }
    text
}

impl StreamState {
    /// Queues the `log` event of `text`, which starts at byte `offset` and ends at `self.offset`.
    fn push_log(&mut self, offset: u64, text: String) {
        let mut data = serde_json::json!({ "offset": offset, "text": text });
        if let Some(ansi) = &mut self.ansi {
            let spans: Vec<Span> = ansi.render(&text).iter().map(Span::from).collect();
            data["spans"] = serde_json::json!(spans);
        }
        self.pending.push_back(
            Event::default()
                .event("log")
                .id(self.offset.to_string())
                .data(data.to_string()),
        );
    }

    async fn next_events(&mut self) -> Result<(), ApiError> {
        let mut recheck = false;
        loop {
            // Take the current version before reading, so an append after the read wakes us.
            let version = *self.rx.borrow_and_update();
            let from = self.offset + self.carry.len() as u64;
            let mut got = Vec::new();
            let (status, size, in_tail) = read_tail(
                &self.store,
                self.job,
                &self.tail,
                version,
                recheck,
                from,
                &mut got,
            )
            .await?;
            recheck = false;
            if !in_tail && from < size {
                // Behind the shared tail (history, or a slow reader): read a page ourselves.
                let chunks = self.store.read_log(self.job, from, PAGE_CHUNKS).await?;
                copy_range(&chunks, from, u64::MAX, &mut got);
            }
            if let Some(to) = self.to {
                got.truncate(to.saturating_sub(from) as usize);
            }
            let stop = self.to.is_some_and(|to| from + got.len() as u64 >= to);
            if !got.is_empty() || stop {
                let next = from + got.len() as u64;
                self.carry.extend_from_slice(&got);
                let held = self.carry.len();
                // At `to`, a character cut there is not waited for.
                let text = take_text(&mut self.carry, stop);
                let consumed = held - self.carry.len();
                if consumed > 0 {
                    self.offset += consumed as u64;
                    self.push_log(self.offset - consumed as u64, text);
                }
                if stop {
                    self.done = true;
                    return Ok(());
                }
                if consumed > 0 {
                    return Ok(());
                }
                if next < size {
                    // Only part of a character so far: read on at once.
                    continue;
                }
                // Only part of a character so far: wait for the rest.
            }
            if status.is_final() {
                if !self.carry.is_empty() {
                    let held = self.carry.len() as u64;
                    let text = take_text(&mut self.carry, true);
                    self.offset += held;
                    self.push_log(self.offset - held, text);
                }
                let job = self.store.get_job(self.job).await?;
                let data = serde_json::json!({ "status": status, "exit_code": job.exit_code, "log_size": size });
                self.pending.push_back(
                    Event::default()
                        .event("end")
                        .id(self.offset.to_string())
                        .data(data.to_string()),
                );
                self.done = true;
                return Ok(());
            }
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        (self.rx, self.tail) = self.store.events.subscribe_log(self.job);
                    }
                }
                // Re-check now and then even without a wake-up, in case a notification was missed.
                _ = tokio::time::sleep(STREAM_RECHECK) => recheck = true,
                _ = self.shutdown.cancelled() => {
                    self.done = true;
                    return Ok(());
                }
            }
        }
    }
}

/// `GET /jobs/{id}/log/stream`: the existing log, then live appends, as Server-Sent Events.
///
/// Each `log` event carries `{"offset", "text"}` and has the byte offset after it as its `id`, so
/// a client that reconnects with `Last-Event-ID` (or `?offset=`) resumes exactly where it was.
/// The `end` event carries the final status.
///
/// With `?format=spans`, each `log` event also carries `"spans"`: its text rendered by
/// [`crate::ansi`], the style carrying from one event to the next (a stream that resumes from an
/// offset starts in the default style). With `?to=N`, the stream stops at byte `N` (without an
/// `end` event), so that the web UI can render an earlier part of the log.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}/log/stream",
    tag = "runs",
    operation_id = "stream_job_log",
    summary = "The log as Server-Sent Events: existing bytes, live appends, then an `end` event (read)",
    params(
        ("id" = String, Path, description = "The job's id (UUID)"),
        ("Last-Event-ID" = Option<String>, Header, description = "A byte offset to resume from"),
        ("offset" = Option<u64>, Query, description = "A byte offset to resume from"),
        ("format" = Option<String>, Query, description = "`text` (the default) or `spans`: each `log` event also carries its text rendered as styled spans (`LogSpans`)", pattern = "^(text|spans)$"),
        ("to" = Option<u64>, Query, description = "A byte offset to stop at: the stream ends, without an `end` event, after the `log` event that reaches it"),
    ),
    security(("api_token" = [])),
    responses(
        (status = 200, description = "`log` events carry `{offset, text}` (and `spans` with `format=spans`, see `LogSpans`); `end` carries the final status", body = LogStreamEvent, content_type = "text/event-stream"),
        (status = 400, description = "The request is malformed", body = ErrorBody),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The token's scope is too small", body = ErrorBody),
        (status = 404, description = "No such object", body = ErrorBody),
    )
)]
pub async fn stream_log(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    caller.require(Scope::Read)?;
    let id = parse_id(&id, "job")?;
    state.store.job_log_state(id).await?;
    let from_header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let query = axum::extract::Query::<StreamQuery>::try_from_uri(&uri).ok();
    let from_query = query.as_ref().and_then(|q| q.offset);
    let ansi = match query.as_ref().and_then(|q| q.format.as_deref()) {
        None | Some("text") => None,
        Some("spans") => Some(Renderer::new()),
        Some(_) => {
            return Err(ApiError::bad_request("format must be `text` or `spans`"));
        }
    };
    let (rx, tail) = state.store.events.subscribe_log(id);
    let st = StreamState {
        rx,
        tail,
        store: state.store.clone(),
        job: id,
        offset: from_header.or(from_query).unwrap_or(0),
        carry: Vec::new(),
        ansi,
        to: query.and_then(|q| q.to),
        pending: VecDeque::new(),
        done: false,
        shutdown: state.shutdown.clone(),
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.done {
                return None;
            }
            if let Err(e) = st.next_events().await {
                tracing::warn!(job.id = %st.job, error = ?e, "log stream failed");
                let data = serde_json::json!({ "message": "the log could not be read; reconnect to resume" });
                st.pending
                    .push_back(Event::default().event("error").data(data.to_string()));
                st.done = true;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_split_characters_for_later() {
        let euro = "€".as_bytes();
        let mut carry = vec![b'a', euro[0], euro[1]];
        assert_eq!(take_text(&mut carry, false), "a");
        assert_eq!(carry, &euro[..2]);
        carry.push(euro[2]);
        assert_eq!(take_text(&mut carry, false), "€");
        assert!(carry.is_empty());
    }

    /// Found by the `log_text` fuzz target's oracle: an invalid byte before a character cut by
    /// the read used to turn the whole buffer lossy, so the cut character became U+FFFD too.
    #[test]
    fn an_invalid_byte_does_not_spoil_a_cut_character() {
        let euro = "€".as_bytes();
        let mut carry = vec![0xff, euro[0], euro[1]];
        assert_eq!(take_text(&mut carry, false), "\u{fffd}");
        assert_eq!(carry, &euro[..2]);
        carry.push(euro[2]);
        assert_eq!(take_text(&mut carry, false), "€");
        let mut carry = vec![b'a', 0xe2, 0x82];
        assert_eq!(take_text(&mut carry, true), "a\u{fffd}");
        assert!(carry.is_empty());
    }

    #[test]
    fn copies_a_range_through_overlaps_up_to_a_gap_or_the_bound() {
        let chunk = |start: i64, data: &str| crate::store::LogChunk {
            start_offset: start,
            data: data.into(),
        };
        // Bytes 0..6 in two overlapping chunks, then a gap (6..8) before the last chunk.
        let chunks = [chunk(0, "abcd"), chunk(2, "cdef"), chunk(8, "ij")];
        let copy = |from: u64, to: u64| {
            let mut out = b">".to_vec();
            let next = copy_range(&chunks, from, to, &mut out);
            (next, String::from_utf8(out).unwrap())
        };
        // The overlap is copied once, and the copy stops at the gap.
        assert_eq!(copy(0, u64::MAX), (6, ">abcdef".into()));
        assert_eq!(copy(1, u64::MAX), (6, ">bcdef".into()));
        assert_eq!(copy(3, u64::MAX), (6, ">def".into()));
        // The upper bound cuts inside the first chunk and inside the overlapping one.
        assert_eq!(copy(0, 3), (3, ">abc".into()));
        assert_eq!(copy(1, 5), (5, ">bcde".into()));
        assert_eq!(copy(2, 2), (2, ">".into()));
        // At or inside the gap nothing is copied; past it, the last chunk is.
        assert_eq!(copy(6, u64::MAX), (6, ">".into()));
        assert_eq!(copy(7, u64::MAX), (7, ">".into()));
        assert_eq!(copy(8, 9), (9, ">i".into()));
        assert_eq!(copy(9, u64::MAX), (10, ">j".into()));
        // Past the end, nothing.
        assert_eq!(copy(10, u64::MAX), (10, ">".into()));
    }

    #[test]
    fn parses_open_ranges_only() {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("bytes=10-"));
        assert_eq!(range_start(&h), Some(10));
        h.insert(header::RANGE, HeaderValue::from_static("bytes=10-20"));
        assert_eq!(range_start(&h), None);
    }
}
