//! Outpost runner: registers with a server, long-polls it for jobs over outbound HTTP(S), and runs
//! their `kubectl`, `helm`, `checkout` and script steps, streaming the log back.
//!
//! The binary (`outpost-runner`) is a thin shell around this library; the server's `dev` command
//! embeds a runner in-process through [`register`], [`Credentials`], [`Settings`] and [`run`].
//!
//! Code map:
//! - [`agent`]: the acquire loop, draining, registration;
//! - [`entra`]: Entra ID tokens from the machine's managed identity, for `register --entra`;
//! - [`job`]: one job from first heartbeat to `complete`, behind the [`job::JobApi`] seam;
//! - `checkout`: the `checkout` step's git commands, with a private repository's token passed to
//!   git through its environment only;
//! - [`process`]: step processes in their own process group, one output pipe, staged kill;
//! - [`logs`]: the job log: masking, the in-memory window and on-disk spool, the batching uploader;
//! - [`mask`]: secret masking of a stream that arrives in pieces;
//! - [`spool`]: the bounded on-disk ring of log bytes the server has not acknowledged;
//! - [`invoke`]: ad-hoc commands from `outpost invoke`: uploaded files, the program to start;
//! - [`expand`]: `${NAME}` in `kubectl`/`helm` arguments and the `{0}` shell line;
//! - [`settings`]: `credentials.json` and `runner.toml`;
//! - [`clusters`]: `[clusters.NAME]` and the per-job kubeconfig;
//! - [`kube_token`]: the `kube-token` exec credential plugin and its token cache;
//! - [`doctor`]: `outpost-runner doctor`, step-by-step checks of the server and each cluster.
//!
//! Invariants: every server call goes through `outpost_protocol::Client`; the runner never
//! listens on a port; no step runs before its job's first heartbeat succeeded; a lost lease stops
//! the job at once and nothing more is reported for it.

#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
mod checkout;
pub mod clusters;
pub mod doctor;
pub mod entra;
pub mod expand;
pub mod invoke;
pub mod job;
pub mod kube_token;
pub mod logs;
pub mod mask;
pub mod process;
pub mod settings;
pub mod spool;

use std::path::PathBuf;

pub use agent::{
    RegisterOptions, RunOptions, register, register_with, register_with_entra, run, run_with_abort,
};
pub use settings::{Credentials, Settings};

/// The config dir when none is given: `$OUTPOST_RUNNER_CONFIG_DIR`, else
/// `$XDG_CONFIG_HOME/outpost-runner`, else `$HOME/.config/outpost-runner`.
pub fn default_config_dir() -> anyhow::Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("OUTPOST_RUNNER_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(xdg) = var("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(xdg).join("outpost-runner"));
    }
    if let Some(home) = var("HOME") {
        return Ok(PathBuf::from(home).join(".config").join("outpost-runner"));
    }
    anyhow::bail!(
        "cannot tell where the runner's configuration lives: pass --config-dir or set OUTPOST_RUNNER_CONFIG_DIR"
    )
}
