//! The Outpost wire contract: JSON types for the runner protocol and the public API, and a typed client.
//!
//! Only these types cross the wire between the server, the runner and the CLI.

#![forbid(unsafe_code)]

pub mod client;
pub mod sse;
pub mod types;

pub use client::{Client, ClientError};
pub use types::*;

/// The version every Outpost binary reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
