//! The client side of the live log: an arbitrary Server-Sent Events body, cut into arbitrary
//! network reads, decodes into events or errors without panicking, every text event ends at or
//! after its start, and nothing follows the `end` event.

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;
use outpost_protocol::ClientError;
use outpost_protocol::sse::{LogEvent, decode_log_stream};
use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut % 32) + 1;
    let reads: Vec<Result<Bytes, ClientError>> = body
        .chunks(step)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    runtime().block_on(async {
        let mut events = decode_log_stream(futures::stream::iter(reads), Duration::from_secs(600));
        let mut ended = false;
        while let Some(item) = events.next().await {
            assert!(!ended, "nothing follows the end event");
            match item {
                Ok(LogEvent::Text {
                    offset,
                    next_offset,
                    ..
                }) => assert!(next_offset >= offset),
                Ok(LogEvent::End { .. }) => ended = true,
                Err(_) => {}
            }
        }
    });
});
