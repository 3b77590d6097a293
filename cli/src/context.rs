//! What every command needs: the client, the server's URL for messages, the output format, and
//! the translation of failures into sentences that say what to do.

use anyhow::bail;
use outpost_protocol::{Client, ClientError};

use crate::output::OutputFormat;

/// Exit code when the command worked.
pub const EXIT_OK: u8 = 0;
/// Exit code when the run or job it watched failed, was cancelled, timed out or was lost.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for usage errors and errors talking to the server.
pub const EXIT_ERROR: u8 = 2;

/// The shared state of one `outpost` invocation.
#[derive(Debug)]
pub struct Ctx {
    /// The typed API client.
    pub client: Client,
    /// The server's base URL as the user gave it, for messages.
    pub server: String,
    /// How to print results.
    pub output: OutputFormat,
}

impl Ctx {
    /// Checks the global options and builds the client.
    pub fn new(server: &str, token: Option<&str>, output: OutputFormat) -> anyhow::Result<Self> {
        let server = server.trim().trim_end_matches('/').to_string();
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            bail!(
                "--server must be a URL such as https://outpost.example.com or \
                 http://127.0.0.1:8080, not {server:?}"
            );
        }
        let token = token.map(str::trim).filter(|t| !t.is_empty());
        let Some(token) = token else {
            bail!("no API token: run `outpost login`, set OUTPOST_TOKEN or pass --token");
        };
        let client = Client::new(&server, Some(token.to_string()))
            .map_err(|e| anyhow::anyhow!("could not set up the HTTP client: {e}"))?;
        Ok(Self {
            client,
            server,
            output,
        })
    }

    /// Turns a failed API call into an error whose message says what happened and what to do.
    pub fn fail(&self, err: ClientError) -> anyhow::Error {
        anyhow::anyhow!(describe(&err, &self.server))
    }

    /// Whether output is JSON.
    pub fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }
}

/// The innermost cause of an error, which is where the useful words are
/// (`Connection refused (os error 111)` rather than `error sending request`).
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Describes a failed API call for a person.
pub fn describe(err: &ClientError, server: &str) -> String {
    match err {
        ClientError::Transport(e) => {
            let cause = root_cause(e);
            if e.is_connect() {
                format!(
                    "could not reach the Outpost server at {server}: {cause} \
                     (check --server or OUTPOST_SERVER)"
                )
            } else if e.is_timeout() {
                format!("the Outpost server at {server} did not answer in time: {cause}")
            } else {
                format!("the connection to the Outpost server at {server} failed: {cause}")
            }
        }
        ClientError::Api {
            status, message, ..
        } => match status.as_u16() {
            401 => format!("{message} (check OUTPOST_TOKEN or --token)"),
            500..=599 => format!("the Outpost server at {server} failed ({status}): {message}"),
            _ => message.clone(),
        },
        ClientError::Decode(m) => {
            format!("unexpected answer from {server}: {m} (is that an Outpost server?)")
        }
    }
}

/// Whether the call failed because the thing asked for does not exist.
pub fn is_not_found(err: &ClientError) -> bool {
    err.status().is_some_and(|s| s.as_u16() == 404)
}

/// Whether an error is a write to a closed pipe (`outpost logs ID | head`), which ends the
/// command quietly.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use outpost_protocol::ClientError;

    use super::*;

    fn api(status: u16, message: &str) -> ClientError {
        ClientError::Api {
            status: status.try_into().unwrap(),
            code: "x".into(),
            message: message.into(),
            next_offset: None,
        }
    }

    #[test]
    fn api_messages_are_shown_plainly() {
        let s = "http://h:1";
        assert_eq!(describe(&api(404, "run 1 not found"), s), "run 1 not found");
        assert_eq!(
            describe(&api(403, "this needs a token with the `admin` scope"), s),
            "this needs a token with the `admin` scope"
        );
        assert!(describe(&api(401, "the token is not valid"), s).contains("OUTPOST_TOKEN"));
        assert!(describe(&api(500, "internal error"), s).contains("http://h:1"));
    }

    #[test]
    fn a_missing_token_says_what_to_do() {
        let err = Ctx::new("http://127.0.0.1:1", None, OutputFormat::Table).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no API token: run `outpost login`, set OUTPOST_TOKEN or pass --token"
        );
        assert!(Ctx::new("http://127.0.0.1:1", Some("  "), OutputFormat::Table).is_err());
    }

    #[test]
    fn the_server_must_be_a_url() {
        let err = Ctx::new("127.0.0.1:8080", Some("t"), OutputFormat::Table).unwrap_err();
        assert!(err.to_string().contains("--server must be a URL"));
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named() {
        // Port 1 on loopback: nothing listens there, so the connection is refused at once.
        let ctx = Ctx::new("http://127.0.0.1:1", Some("t"), OutputFormat::Table).unwrap();
        let err = ctx.client.list_runners().await.unwrap_err();
        let msg = describe(&err, &ctx.server);
        assert!(
            msg.starts_with("could not reach the Outpost server at http://127.0.0.1:1: "),
            "{msg}"
        );
    }
}
