//! `outpost`: apply pipelines, start runs, follow their logs and look after runners from a
//! terminal.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use outpost_protocol::RunStatus;
use uuid::Uuid;

mod commands;
mod config;
mod context;
mod invoke;
mod logs;
mod output;

use context::{Ctx, EXIT_ERROR};
use output::OutputFormat;

/// Outpost: deploy into private Kubernetes clusters through runners inside their network.
///
/// Every command talks to an Outpost server's HTTP API with an API token.
/// Create a token on the server with `outpost-server token create --name NAME --scope SCOPE`
/// (`read`, `trigger`, `invoke` or `admin`), then save it with `outpost login`, or export it
/// as OUTPOST_TOKEN.
///
/// Exit codes: 0 when the command worked (and the run or job it watched succeeded), 1 when the
/// watched run or job failed, was cancelled, timed out or was lost, 2 for usage errors and
/// errors from the server; `outpost invoke` exits with the remote command's own exit code.
#[derive(Debug, Parser)]
#[command(name = "outpost", version, propagate_version = true)]
struct Cli {
    /// The Outpost server's base URL [default: the one `outpost login` saved, else
    /// http://127.0.0.1:8080].
    #[arg(long, global = true, value_name = "URL", env = "OUTPOST_SERVER")]
    server: Option<String>,

    /// The API token to authenticate with [default: the one `outpost login` saved].
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "OUTPOST_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,

    /// How to print results: `table` for people, `json` for scripts (live logs become one JSON
    /// object per line).
    #[arg(
        long,
        short = 'o',
        global = true,
        value_enum,
        value_name = "FORMAT",
        env = "OUTPOST_OUTPUT",
        default_value_t = OutputFormat::Table
    )]
    output: OutputFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, update and list pipelines.
    Pipeline {
        #[command(subcommand)]
        action: PipelineCommand,
    },
    /// Start a run of a pipeline, and optionally follow it to the end.
    Run(RunArgs),
    /// List recent runs, newest first.
    Runs(RunsArgs),
    /// Show the log of a job, or of every job of a run.
    Logs(LogsArgs),
    /// Cancel a run (all its unfinished jobs) or a single job.
    Cancel(CancelArgs),
    /// List the runners registered with the server.
    Runners,
    /// Run one command on a runner next to a private cluster, streaming its output live
    ///
    /// The command runs on a runner that carries the labels (or serves the cluster) you name,
    /// as a direct process without a shell unless --shell is given; its output streams to your
    /// terminal as it is printed, and `outpost` exits with the command's exit code.
    /// `kubectl` and `helm` as the first word run the runner's kubectl/helm with KUBECONFIG set
    /// for the cluster, like `kubectl:`/`helm:` pipeline steps.
    /// Ctrl-C cancels the command on the runner and exits 130 once the runner confirms.
    ///
    /// Needs a token with the `invoke` scope (or `admin`); every invoke is recorded in the
    /// audit trail (`outpost audit`).
    ///
    /// Examples:
    ///
    ///   outpost invoke --cluster aks-prod -- kubectl get pods -A
    ///
    ///   outpost invoke --cluster aks-prod --file app.yaml -- kubectl apply -f app.yaml
    ///
    ///   outpost invoke --labels linux,vnet-a --shell -- 'curl -sf http://10.0.0.4/healthz | jq .'
    #[command(verbatim_doc_comment)]
    Invoke(InvokeArgs),
    /// Show the audit trail: who invoked which command where, and how it ended (needs `admin`).
    Audit(AuditArgs),
    /// Save the server and token in the config file, after checking them.
    ///
    /// The file is $OUTPOST_CONFIG, else $XDG_CONFIG_HOME/outpost/config.toml, else
    /// ~/.config/outpost/config.toml, written with mode 0600. Without --token (or OUTPOST_TOKEN)
    /// the token is read from standard input. --server, --token and the OUTPOST_* variables
    /// still win over the file.
    Login,
    /// Remove the saved token from the config file.
    Logout,
}

#[derive(Debug, Args)]
struct InvokeArgs {
    /// Run on a runner that serves this cluster (its `cluster:NAME` label); kubectl and helm
    /// get KUBECONFIG for it.
    #[arg(long, value_name = "NAME", required_unless_present = "labels")]
    cluster: Option<String>,
    /// Run on a runner that carries all these labels (comma-separated or repeated).
    #[arg(long, value_name = "LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    /// Stop the command after this long, e.g. 90s, 5m, 1h [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = invoke::parse_timeout)]
    timeout: Option<std::time::Duration>,
    /// Upload a local file into the job's workspace under its file name before the command
    /// starts (repeat for more; at most 1 MiB each, 4 MiB in all).
    #[arg(long = "file", short = 'f', value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Run the command as a script with the runner's shell (bash), so pipes, `&&` and
    /// variables work; without it the words run as one process, no shell involved.
    #[arg(long)]
    shell: bool,
    /// The command and its arguments, after `--`.
    #[arg(value_name = "COMMAND", required = true, num_args = 1.., last = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct AuditArgs {
    /// Only records of this kind, e.g. `invoke`.
    #[arg(long, value_name = "KIND")]
    kind: Option<String>,
    /// At most this many records.
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: u32,
}

#[derive(Debug, Subcommand)]
enum PipelineCommand {
    /// Create or replace pipelines from YAML files (needs an `admin` token).
    ///
    /// Each file becomes the pipeline named after the file without its extension
    /// (`deploy-web.yaml` becomes `deploy-web`). A file the server rejects is reported with the
    /// line and column of the problem; the other files are still applied.
    Apply {
        /// The pipeline YAML files.
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// The pipeline's name, instead of the file name (only with a single file).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// List pipelines.
    List,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The pipeline to run.
    #[arg(value_name = "PIPELINE")]
    pipeline: String,
    /// A variable for this run, overriding the pipeline's (repeat for more).
    #[arg(long = "var", value_name = "KEY=VALUE", value_parser = parse_var)]
    vars: Vec<(String, String)>,
    /// The git ref the jobs work on, e.g. `refs/heads/main`.
    #[arg(long = "ref", value_name = "REF")]
    git_ref: Option<String>,
    /// The commit the jobs work on.
    #[arg(long, value_name = "SHA")]
    sha: Option<String>,
    /// Stream each job's log as it runs, in the order the jobs start, and exit with 0 when the
    /// run succeeded and 1 when it failed or was cancelled.
    #[arg(long, short = 'f')]
    follow: bool,
}

#[derive(Debug, Args)]
struct RunsArgs {
    /// Only runs of this pipeline.
    #[arg(long, value_name = "PIPELINE")]
    pipeline: Option<String>,
    /// Only runs with this status.
    #[arg(long, value_name = "STATUS", value_parser = parse_run_status)]
    status: Option<RunStatus>,
    /// At most this many runs.
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: u32,
}

#[derive(Debug, Args)]
struct LogsArgs {
    /// A job id, or a run id for the logs of all its jobs in the order they started.
    #[arg(value_name = "ID")]
    id: Uuid,
    /// Follow the log live until the job (or every job of the run) ends; a dropped connection
    /// is resumed where it stopped. Exits with 0 when the job or run succeeded, 1 otherwise.
    #[arg(long, short = 'f')]
    follow: bool,
}

#[derive(Debug, Args)]
struct CancelArgs {
    /// The id of the run or job to cancel.
    #[arg(value_name = "ID")]
    id: Uuid,
}

/// Parses `KEY=VALUE`.
fn parse_var(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("the variable in {s:?} has no name before `=`"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Parses a run status as the API spells it.
fn parse_run_status(s: &str) -> Result<RunStatus, String> {
    RunStatus::parse(s).ok_or_else(|| {
        format!("unknown status {s:?}: use queued, running, succeeded, failed or cancelled")
    })
}

async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let config_path = config::path();
    let file = match &config_path {
        Some(p) => config::load(p)?,
        None => config::FileConfig::default(),
    };
    match cli.command {
        Command::Login => {
            return commands::login(
                config_path.as_deref(),
                cli.server.as_deref(),
                cli.token.as_deref(),
                &file,
                cli.output,
            )
            .await;
        }
        Command::Logout => return commands::logout(config_path.as_deref(), file),
        _ => {}
    }
    let resolved = config::resolve(cli.server.as_deref(), cli.token.as_deref(), &file)?;
    let ctx = Ctx::new(&resolved.server, resolved.token.as_deref(), cli.output)?;
    match cli.command {
        Command::Login | Command::Logout => unreachable!("handled above"),
        Command::Invoke(args) => {
            invoke::invoke(
                &ctx,
                invoke::Invoke {
                    argv: args.command,
                    shell: args.shell,
                    cluster: args.cluster,
                    labels: args.labels,
                    timeout: args.timeout,
                    files: args.files,
                },
            )
            .await
        }
        Command::Audit(args) => invoke::audit(&ctx, args.kind.as_deref(), args.limit).await,
        Command::Pipeline {
            action: PipelineCommand::Apply { files, name },
        } => commands::pipeline_apply(&ctx, &files, name.as_deref()).await,
        Command::Pipeline {
            action: PipelineCommand::List,
        } => commands::pipeline_list(&ctx).await,
        Command::Run(args) => {
            let vars: BTreeMap<String, String> = args.vars.into_iter().collect();
            commands::run(
                &ctx,
                &args.pipeline,
                vars,
                args.git_ref,
                args.sha,
                args.follow,
            )
            .await
        }
        Command::Runs(args) => {
            commands::runs(&ctx, args.pipeline.as_deref(), args.status, args.limit).await
        }
        Command::Logs(args) => commands::logs(&ctx, args.id, args.follow).await,
        Command::Cancel(args) => commands::cancel(&ctx, args.id).await,
        Command::Runners => commands::runners(&ctx).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        // The reader went away (`outpost logs ID | head`): nothing is left to say to anyone.
        Err(e) if context::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_and_flag_has_help() {
        fn check(cmd: &clap::Command, path: &str) {
            let path = format!("{path} {}", cmd.get_name());
            for arg in cmd.get_arguments() {
                if arg.get_id() == "help" || arg.get_id() == "version" {
                    continue;
                }
                assert!(
                    arg.get_help().is_some(),
                    "`{path}` argument `{}` has no help",
                    arg.get_id()
                );
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                assert!(
                    sub.get_about().is_some(),
                    "`{path} {}` has no help",
                    sub.get_name()
                );
                check(sub, &path);
            }
        }
        check(&Cli::command(), "");
    }

    #[test]
    fn variables_are_key_equals_value() {
        assert_eq!(parse_var("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(
            parse_var("EMPTY=").unwrap(),
            ("EMPTY".into(), String::new())
        );
        assert!(parse_var("novalue").is_err());
        assert!(parse_var("=x").is_err());
    }

    #[test]
    fn follow_and_filters_parse() {
        let cli = Cli::try_parse_from([
            "outpost", "run", "hello", "--var", "A=1", "--var", "B=2", "--ref", "main", "-f",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not a run")
        };
        assert!(args.follow);
        assert_eq!(args.vars.len(), 2);
        assert_eq!(args.git_ref.as_deref(), Some("main"));

        let cli =
            Cli::try_parse_from(["outpost", "runs", "--status", "failed", "-o", "json"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        let Command::Runs(args) = cli.command else {
            panic!("not runs")
        };
        assert_eq!(args.status, Some(RunStatus::Failed));
        assert!(Cli::try_parse_from(["outpost", "runs", "--status", "nope"]).is_err());
        assert!(Cli::try_parse_from(["outpost", "logs", "not-a-uuid"]).is_err());
    }
}
