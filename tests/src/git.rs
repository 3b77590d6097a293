//! Repositories for `checkout` tests, made with the real `git`, and a private forge: a small HTTP
//! server that serves a bare repository over git's "dumb" HTTP protocol (plain files) only to
//! requests that carry the right basic-auth token.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use tempfile::TempDir;

/// A work repository and a bare repository beside it that receives every commit, as a forge
/// would hold it.
pub struct GitRepo {
    dir: TempDir,
}

impl GitRepo {
    /// An empty repository (branch `main`) and its bare twin.
    pub fn new() -> GitRepo {
        let dir = tempfile::Builder::new()
            .prefix("outpost-e2e-git-")
            .tempdir()
            .expect("a temporary directory can be created");
        let repo = GitRepo { dir };
        std::fs::create_dir_all(repo.work()).expect("the work tree can be created");
        repo.git(&["init", "-q", "-b", "main"]);
        let bare = repo.bare();
        run_git(
            repo.dir.path(),
            &[
                "init",
                "-q",
                "--bare",
                "-b",
                "main",
                &bare.to_string_lossy(),
            ],
        );
        repo
    }

    /// The work tree.
    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// The bare repository, named `repo.git`.
    pub fn bare(&self) -> PathBuf {
        self.dir.path().join("repo.git")
    }

    /// `file://…/repo.git`.
    pub fn file_url(&self) -> String {
        format!("file://{}", self.bare().display())
    }

    /// Writes `files` (path, content) into the work tree.
    pub fn write(&self, files: &[(&str, &str)]) {
        for (path, content) in files {
            let path = self.work().join(path);
            std::fs::create_dir_all(path.parent().expect("a file has a parent"))
                .expect("the file's directory can be created");
            std::fs::write(&path, content)
                .unwrap_or_else(|e| panic!("could not write {}: {e}", path.display()));
        }
    }

    /// Copies the directory `from` into the work tree as `to`.
    pub fn copy_dir(&self, from: &Path, to: &str) {
        copy_tree(from, &self.work().join(to));
    }

    /// Commits everything in the work tree, pushes it to the bare repository and returns the
    /// commit's sha.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", message]);
        let sha = self.git(&["rev-parse", "HEAD"]);
        let bare = self.bare();
        self.git(&[
            "push",
            "-q",
            &bare.to_string_lossy(),
            "HEAD:refs/heads/main",
        ]);
        // What the dumb HTTP protocol reads instead of asking a git process.
        run_git(&bare, &["update-server-info"]);
        sha
    }

    /// Runs git in the work tree and returns its trimmed stdout.
    pub fn git(&self, args: &[&str]) -> String {
        run_git(&self.work(), args)
    }
}

impl Default for GitRepo {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs git with a fixed identity and no user or system configuration.
fn run_git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Outpost Test")
        .env("GIT_AUTHOR_EMAIL", "test@outpost.invalid")
        .env("GIT_COMMITTER_NAME", "Outpost Test")
        .env("GIT_COMMITTER_EMAIL", "test@outpost.invalid")
        .output()
        .unwrap_or_else(|e| panic!("could not run git {args:?}: {e}"));
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to)
        .unwrap_or_else(|e| panic!("could not create {}: {e}", to.display()));
    let entries = std::fs::read_dir(from)
        .unwrap_or_else(|e| panic!("could not read {}: {e}", from.display()));
    for entry in entries {
        let entry = entry.expect("a directory entry can be read");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("could not copy {}: {e}", entry.path().display()));
        }
    }
}

/// One request the forge answered.
#[derive(Debug, Clone)]
pub struct ForgeRequest {
    /// The path and query.
    pub uri: String,
    /// The `Authorization` header as sent, if any.
    pub authorization: Option<String>,
    /// The status answered.
    pub status: u16,
}

#[derive(Clone)]
struct ForgeState {
    root: PathBuf,
    expected: String,
    requests: Arc<Mutex<Vec<ForgeRequest>>>,
}

/// A private forge on `127.0.0.1`: serves one bare repository as `/<name>.git/…` over git's
/// dumb HTTP protocol, and only with `Authorization: Basic base64(USER:TOKEN)` for any user name;
/// anything else answers `401` with a basic-auth challenge, as GitHub and GitLab do.
pub struct PrivateForge {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<ForgeRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PrivateForge {
    /// Serves `repo`'s bare repository to requests with `token`.
    pub async fn start(repo: &GitRepo, token: &str) -> PrivateForge {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let state = ForgeState {
            root: repo.bare(),
            expected: token.to_string(),
            requests: requests.clone(),
        };
        let app = axum::Router::new().fallback(serve).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port on 127.0.0.1 can be bound");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        PrivateForge {
            addr,
            requests,
            task,
        }
    }

    /// The clone URL, e.g. `http://127.0.0.1:40123/acme/web.git`.
    pub fn url(&self) -> String {
        format!("http://{}/acme/web.git", self.addr)
    }

    /// The requests answered so far.
    pub fn requests(&self) -> Vec<ForgeRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for PrivateForge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `authorization` is `Basic base64(user:expected)` for some user name.
fn authorized(authorization: Option<&str>, expected: &str) -> bool {
    let Some(encoded) = authorization.and_then(|a| a.strip_prefix("Basic ")) else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let decoded = String::from_utf8_lossy(&decoded);
    decoded
        .split_once(':')
        .is_some_and(|(_, password)| password == expected)
}

async fn serve(State(state): State<ForgeState>, uri: Uri, headers: HeaderMap) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let response = if !authorized(authorization.as_deref(), &state.expected) {
        (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"outpost test forge\"",
            )],
            "authentication required\n",
        )
            .into_response()
    } else {
        match file_for(&state.root, uri.path()) {
            Some(path) => match tokio::fs::read(&path).await {
                Ok(bytes) => (
                    // Not `application/x-git-upload-pack-advertisement`: git falls back to the
                    // dumb protocol, which needs nothing but these files.
                    [(header::CONTENT_TYPE, "text/plain")],
                    Body::from(bytes),
                )
                    .into_response(),
                Err(_) => StatusCode::NOT_FOUND.into_response(),
            },
            None => StatusCode::NOT_FOUND.into_response(),
        }
    };
    state
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ForgeRequest {
            uri: uri.to_string(),
            authorization,
            status: response.status().as_u16(),
        });
    response
}

/// The file under `root` for `/acme/web.git/<rest>`, refusing anything that leaves `root`.
fn file_for(root: &Path, path: &str) -> Option<PathBuf> {
    let rest = path.strip_prefix("/acme/web.git/")?;
    let mut file = root.to_path_buf();
    for c in Path::new(rest).components() {
        match c {
            Component::Normal(part) => file.push(part),
            _ => return None,
        }
    }
    Some(file)
}
