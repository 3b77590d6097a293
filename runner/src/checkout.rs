//! `checkout`: the triggering repository at the triggering commit, fetched into the workspace.
//!
//! git runs directly, never through a shell: `git init`, `git fetch --depth N <url> <sha>` (when
//! the server refuses to fetch a bare commit, or cannot fetch shallow, all branches and tags
//! instead), then `git checkout --detach <sha>`.
//!
//! A private repository's token reaches git through the environment of the fetch only:
//! `GIT_CONFIG_COUNT`, `GIT_CONFIG_KEY_n` and `GIT_CONFIG_VALUE_n` add an
//! `http.<origin>.extraHeader` with the token for that one git process. So the token is never in
//! git's arguments (which every user of the machine can read in `/proc`), never written to
//! `.git/config` (which later steps and a kept workspace expose), and never in the log, which
//! shows the commands as they were run. The header is scoped to the clone URL's origin, so a
//! redirect to another host does not receive it.

use std::future::Future;
use std::path::{Component, Path, PathBuf};

use outpost_protocol::AssignedJob;

use crate::job::CommandEnd;
use crate::logs::LogWriter;
use crate::process::CommandSpec;

/// The user name forges accept with an access token as the password (GitHub, Gitea and Azure
/// DevOps take any user name; GitLab takes any with a project or personal access token).
const TOKEN_USER: &str = "x-access-token";

/// One `checkout` step: what to fetch and where, as the job and the step say.
pub(crate) struct Checkout<'a> {
    /// The job, for its trigger (clone URL and commit) and its secrets.
    pub job: &'a AssignedJob,
    /// The step's `path`, relative to the workspace.
    pub path: Option<&'a str>,
    /// The step's `depth`; 1 when absent.
    pub depth: Option<u32>,
    /// The name of the secret holding the token, if the repository is private.
    pub token_secret: Option<&'a str>,
    /// The job's workspace.
    pub workspace: &'a Path,
    /// The `git` binary.
    pub git: &'a Path,
    /// The environment every step gets on top of the runner's.
    pub env: &'a [(String, String)],
}

/// Runs one command as a part of the running step, so that cancellation, timeouts and the output
/// are handled as for any other command of a step.
pub(crate) trait Exec {
    /// Runs `spec` until it exits or the step is stopped.
    fn exec(&mut self, spec: &CommandSpec) -> impl Future<Output = CommandEnd> + Send;
}

/// Runs the checkout: each git command goes through `exec`; notes go to `log`.
pub(crate) async fn run(c: &Checkout<'_>, log: &LogWriter, exec: &mut impl Exec) -> CommandEnd {
    let trigger = &c.job.trigger;
    let (Some(url), Some(sha)) = (
        trigger.clone_url.as_deref().filter(|s| !s.is_empty()),
        trigger.sha.as_deref().filter(|s| !s.is_empty()),
    ) else {
        log.line(
            "✘ checkout needs a repository and a commit: this run has none (trigger it from a webhook or pass ref/sha)",
        );
        return CommandEnd::NotStarted(None);
    };
    let dir = match c.path {
        None => c.workspace.to_path_buf(),
        Some(p) => match relative_inside(p) {
            Some(rel) => c.workspace.join(rel),
            None => {
                log.line(&format!(
                    "✘ checkout path `{p}` must be a relative path inside the workspace"
                ));
                return CommandEnd::NotStarted(None);
            }
        },
    };
    let token = match c.token_secret {
        None => None,
        Some(name) => match c.job.secrets.get(name).filter(|v| !v.is_empty()) {
            Some(value) => Some((name, value.as_str())),
            None => {
                log.line(&format!(
                    "✘ checkout takes its token from secret `{name}`, but the job did not receive it: set it on the server (`outpost-server secret set {name}`) and list it under the pipeline's `secrets:`"
                ));
                return CommandEnd::NotStarted(None);
            }
        },
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        log.line(&format!("✘ could not create {}: {e}", dir.display()));
        return CommandEnd::NotStarted(None);
    }

    let mut env = c.env.to_vec();
    // A missing or wrong token must fail the step, not wait for someone to type a password.
    env.push(("GIT_TERMINAL_PROMPT".into(), "0".into()));
    env.push(("GCM_INTERACTIVE".into(), "never".into()));
    let mut fetch_env = env.clone();
    if let Some((name, value)) = token {
        match auth_env(url, value, c.env) {
            Some(extra) => {
                log.line(&format!(
                    "Authenticating with the token in secret `{name}` (given to git in its environment, not on its command line or in .git/config)"
                ));
                fetch_env.extend(extra);
            }
            None => log.line(&format!(
                "⚠ the token in secret `{name}` is used for http(s) URLs only, and `{}` is not one: fetching without it",
                redact_userinfo(url)
            )),
        }
    }
    let git = |args: &[&str], env: &[(String, String)]| CommandSpec {
        program: c.git.to_path_buf(),
        args: args.iter().map(|s| s.to_string()).collect(),
        cwd: dir.clone(),
        env: env.to_vec(),
    };
    let shown_url = redact_userinfo(url);
    let depth = c.depth.unwrap_or(1).to_string();
    let fetch = ["fetch", "--no-tags", "--depth", &depth, url, sha];

    log.line("$ git init -q");
    match exec.exec(&git(&["init", "-q"], &env)).await {
        CommandEnd::Exited(0) => {}
        other => return other,
    }
    log.line(&format!(
        "$ git fetch --no-tags --depth {depth} {} {sha}",
        shell_words::quote(&shown_url)
    ));
    match exec.exec(&git(&fetch, &fetch_env)).await {
        CommandEnd::Exited(0) => {}
        CommandEnd::Exited(_) => {
            log.line(
                "⚠ fetching the commit directly failed; fetching the repository's branches and tags instead",
            );
            let full = [
                "fetch",
                "--tags",
                url,
                "+refs/heads/*:refs/remotes/origin/*",
            ];
            log.line(&format!(
                "$ git fetch --tags {} '+refs/heads/*:refs/remotes/origin/*'",
                shell_words::quote(&shown_url)
            ));
            match exec.exec(&git(&full, &fetch_env)).await {
                CommandEnd::Exited(0) => {}
                other => return other,
            }
        }
        other => return other,
    }
    log.line(&format!("$ git checkout --detach {sha}"));
    let checkout = [
        "-c",
        "advice.detachedHead=false",
        "checkout",
        "-q",
        "--detach",
        sha,
    ];
    exec.exec(&git(&checkout, &env)).await
}

/// The variables that make git send `Authorization: Basic …` with the token to the clone URL's
/// origin, or `None` when the URL is not http(s) (ssh and local repositories do not use it).
///
/// Entries already counted by a `GIT_CONFIG_COUNT` in `env` or in the runner's own environment are
/// kept: ours are appended after them.
fn auth_env(url: &str, token: &str, env: &[(String, String)]) -> Option<Vec<(String, String)>> {
    let origin = http_origin(url)?;
    let existing = env
        .iter()
        .rev()
        .find(|(k, _)| k == "GIT_CONFIG_COUNT")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var("GIT_CONFIG_COUNT").ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(0);
    let credentials = base64(format!("{TOKEN_USER}:{token}").as_bytes());
    Some(vec![
        ("GIT_CONFIG_COUNT".into(), (existing + 1).to_string()),
        (
            format!("GIT_CONFIG_KEY_{existing}"),
            format!("http.{origin}.extraHeader"),
        ),
        (
            format!("GIT_CONFIG_VALUE_{existing}"),
            format!("Authorization: Basic {credentials}"),
        ),
    ])
}

/// `scheme://host[:port]/` of an http(s) URL, without any user name, or `None`.
fn http_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.is_empty() {
        return None;
    }
    Some(format!("{scheme}://{host}/"))
}

/// Standard base64 with padding (RFC 4648), for the basic-auth header.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `p` as a relative path that stays inside its base, or `None`.
fn relative_inside(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// `https://user:token@host/x` as `https://***@host/x`, so credentials in a clone URL stay out of
/// the log.
fn redact_userinfo(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let host_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..host_end].rfind('@') {
            return format!("{}***{}", &url[..scheme_end + 3], &rest[at..]);
        }
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkout_paths_stay_inside_the_workspace() {
        assert_eq!(relative_inside("src/app"), Some(PathBuf::from("src/app")));
        assert_eq!(relative_inside("./x"), Some(PathBuf::from("x")));
        assert_eq!(relative_inside("../x"), None);
        assert_eq!(relative_inside("/etc"), None);
    }

    #[test]
    fn clone_url_credentials_are_redacted() {
        assert_eq!(
            redact_userinfo("https://x-access-token:abc@github.com/acme/web.git"),
            "https://***@github.com/acme/web.git"
        );
        assert_eq!(
            redact_userinfo("https://github.com/acme/web.git"),
            "https://github.com/acme/web.git"
        );
        assert_eq!(redact_userinfo("/srv/git/web"), "/srv/git/web");
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, output) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("x-access-token:s3cr3t", "eC1hY2Nlc3MtdG9rZW46czNjcjN0"),
        ] {
            assert_eq!(base64(input.as_bytes()), output, "{input:?}");
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn the_token_header_is_scoped_to_the_origin_and_appended_to_existing_config() {
        let env = auth_env(
            "https://acme@dev.azure.com:443/acme/web/_git/web",
            "s3cr3t",
            &[("GIT_CONFIG_COUNT".into(), "2".into())],
        )
        .unwrap();
        assert_eq!(
            env,
            vec![
                ("GIT_CONFIG_COUNT".to_string(), "3".to_string()),
                (
                    "GIT_CONFIG_KEY_2".to_string(),
                    "http.https://dev.azure.com:443/.extraHeader".to_string()
                ),
                (
                    "GIT_CONFIG_VALUE_2".to_string(),
                    "Authorization: Basic eC1hY2Nlc3MtdG9rZW46czNjcjN0".to_string()
                ),
            ]
        );
        assert!(auth_env("file:///srv/git/web.git", "t", &[]).is_none());
        assert!(auth_env("git@github.com:acme/web.git", "t", &[]).is_none());
        assert!(auth_env("/srv/git/web.git", "t", &[]).is_none());
        assert_eq!(
            http_origin("HTTP://127.0.0.1:8080/web.git?x#y").as_deref(),
            Some("http://127.0.0.1:8080/")
        );
    }
}
