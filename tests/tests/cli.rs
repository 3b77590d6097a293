//! The `outpost` CLI end to end: real `outpost-server`, `outpost-runner` and `outpost` binaries,
//! real kubectl, a real database per test.
//!
//! Covered: apply, run and follow to the end with the run's exit code; `logs -f` across a server
//! restart; `outpost invoke` with its exit codes, uploaded files, Ctrl-C, the `invoke`
//! permission and the audit trail; `outpost login`.

use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_tests::outpost_protocol::{
    AuditList, INVOKE_PIPELINE, JobStatus, RunList, RunStatus, TriggerKind,
};
use outpost_tests::{
    Backend, SECRETS_KEY_ENV, Scope, TestRunner, TestServer, backend_tests, binary, eventually,
    scratch_dir, test_db, wait_for_job,
};
use tokio::io::AsyncReadExt as _;
use tokio::process::{Child, Command};

backend_tests!(
    run_follow_and_logs_follow_across_a_server_restart,
    invoke_runs_commands_and_propagates_exit_codes,
    invoke_is_refused_without_the_permission_and_audited_with_it,
    ctrl_c_cancels_the_remote_command,
    the_web_run_command_box_needs_the_permission_and_streams_the_job,
    login_saves_a_private_config_that_later_commands_use,
);

/// How long one CLI command may take, following a job included.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a background wait may take.
const WAIT: Duration = Duration::from_secs(60);

/// `outpost ARGS` against `server` with `token`, with no stray `OUTPOST_*` settings and a
/// config file that does not exist (so a developer's own login never leaks in).
fn outpost(server: &TestServer, token: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("outpost"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OUTPOST") {
            cmd.env_remove(key);
        }
    }
    cmd.env("OUTPOST_SERVER", server.url())
        .env("OUTPOST_TOKEN", token)
        .env("OUTPOST_CONFIG", "/nonexistent/outpost-test-config.toml")
        .env("NO_COLOR", "1")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs a command to its end (bounded) and returns its output.
async fn finish(mut cmd: Command, what: &str) -> Output {
    match tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("could not run `{what}`: {e}"),
        Err(_) => panic!("`{what}` did not finish within {COMMAND_TIMEOUT:?}"),
    }
}

/// Runs `outpost ARGS` and returns (exit code, stdout, stderr).
async fn cli(server: &TestServer, token: &str, args: &[&str]) -> (i32, String, String) {
    let what = format!("outpost {}", args.join(" "));
    let out = finish(outpost(server, token, args), &what).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if std::env::var_os("TEST_LOG").is_some() {
        eprintln!("[{what}] exit {:?}\n{stdout}\n{stderr}", out.status.code());
    }
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("`{what}` was killed by a signal: {}", out.status));
    (code, stdout, stderr)
}

/// A child's stdout, collected as it arrives, so a test can wait for a line while it runs; the
/// task ends at the end of the output.
fn collect_stdout(child: &mut Child) -> (Arc<Mutex<String>>, tokio::task::JoinHandle<()>) {
    let text = Arc::new(Mutex::new(String::new()));
    let mut out = child.stdout.take().expect("stdout is piped");
    let sink = text.clone();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf).await {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (text, task)
}

async fn wait_exit(child: &mut Child, what: &str) -> i32 {
    let status = tokio::time::timeout(COMMAND_TIMEOUT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("`{what}` did not exit within {COMMAND_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("waiting for `{what}` failed: {e}"));
    status
        .code()
        .unwrap_or_else(|| panic!("`{what}` was killed by a signal: {status}"))
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("the scratch dir is writable");
    path.to_string_lossy().into_owned()
}

/// Invoke runs, newest first.
async fn invoke_runs(server: &TestServer) -> RunList {
    server
        .client()
        .list_runs(Some(INVOKE_PIPELINE), None, Some(200), None)
        .await
        .expect("GET /api/v1/runs")
}

async fn run_follow_and_logs_follow_across_a_server_restart(backend: Backend) {
    let db = test_db!(backend);
    let mut server = TestServer::start(&db, &[]).await;
    let _runner = TestRunner::start(&server, "r1", &["e2e"], &[]).await;
    let admin = server.admin_token().to_string();
    let dir = scratch_dir();

    let ok = write(
        dir.path(),
        "hello.yaml",
        "jobs:\n  greet:\n    runs_on: [e2e]\n    steps:\n      - run: echo \"hello-$((6 * 7))\"\n",
    );
    let bad = write(
        dir.path(),
        "broken.yaml",
        "jobs:\n  fail:\n    runs_on: [e2e]\n    steps:\n      - run: exit 4\n",
    );
    let (code, stdout, stderr) = cli(&server, &admin, &["pipeline", "apply", &ok, &bad]).await;
    assert_eq!(code, 0, "apply failed: {stdout}{stderr}");
    assert!(stdout.contains("pipeline hello created"), "{stdout}");
    assert!(stdout.contains("pipeline broken created"), "{stdout}");

    let (code, stdout, stderr) = cli(&server, &admin, &["run", "hello", "--follow"]).await;
    assert_eq!(code, 0, "run --follow: {stdout}{stderr}");
    assert!(
        stdout.contains("hello-42"),
        "the log was not streamed: {stdout}"
    );
    assert!(stdout.contains("Run hello #1 succeeded"), "{stdout}");

    let (code, stdout, stderr) = cli(&server, &admin, &["run", "broken", "--follow"]).await;
    assert_eq!(code, 1, "a failing run exits 1: {stdout}{stderr}");
    assert!(stdout.contains("Run broken #1 failed"), "{stdout}");

    // A job that prints, then waits for a gate file the test creates after the restart. The
    // printed words are computed, so that the script's echo in the log does not match them.
    let gate = dir.path().join("gate");
    let gated = write(
        dir.path(),
        "gated.yaml",
        &format!(
            "jobs:\n  wait:\n    runs_on: [e2e]\n    steps:\n      - run: |\n          echo \"before-$((1 + 1))\"\n          while [ ! -e {} ]; do sleep 0.1; done\n          echo \"after-$((1 + 1))\"\n",
            gate.display()
        ),
    );
    let (code, _, stderr) = cli(&server, &admin, &["pipeline", "apply", &gated]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = cli(&server, &admin, &["run", "gated", "-o", "json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let run: serde_json::Value = serde_json::from_str(&stdout).expect("run -o json is JSON");
    let run_id = run["id"].as_str().expect("the run has an id").to_string();

    let mut follower = outpost(&server, &admin, &["logs", &run_id, "-f"])
        .spawn()
        .expect("outpost logs -f starts");
    let (seen, reader) = collect_stdout(&mut follower);
    eventually("the follower to print the first line", WAIT, || async {
        let text = seen.lock().unwrap().clone();
        if text.contains("before-2") {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;

    server.restart().await;
    std::fs::write(&gate, b"").expect("the gate can be created");

    let code = wait_exit(&mut follower, "outpost logs -f").await;
    tokio::time::timeout(WAIT, reader)
        .await
        .expect("the follower's output ends when it exits")
        .expect("the reader task does not panic");
    let text = seen.lock().unwrap().clone();
    assert_eq!(code, 0, "logs -f exits with the job's success: {text}");
    assert_eq!(text.matches("before-2").count(), 1, "{text}");
    assert_eq!(text.matches("after-2").count(), 1, "{text}");
    assert!(text.contains("Run gated #1 succeeded"), "{text}");

    // `logs` of a failed run exits 1 too, without following.
    let runs = server
        .client()
        .list_runs(Some("broken"), None, None, None)
        .await
        .expect("GET runs");
    let broken = runs.runs[0].id.to_string();
    let (code, stdout, _) = cli(&server, &admin, &["logs", &broken]).await;
    assert_eq!(code, 1, "{stdout}");
}

async fn invoke_runs_commands_and_propagates_exit_codes(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let _runner = TestRunner::start(&server, "near-cluster", &["e2e", "cluster:kind"], &[]).await;
    let admin = server.admin_token().to_string();

    let (code, stdout, stderr) = cli(
        &server,
        &admin,
        &[
            "invoke", "--labels", "e2e", "--", "kubectl", "version", "--client",
        ],
    )
    .await;
    assert_eq!(code, 0, "kubectl version: {stdout}{stderr}");
    assert!(
        stdout.contains("Client Version"),
        "kubectl's output is streamed: {stdout}"
    );
    // The output is the command's own, with no runner framing around it.
    assert!(!stdout.contains("Step 1/1"), "{stdout}");

    let (code, stdout, stderr) = cli(
        &server,
        &admin,
        &[
            "invoke",
            "--labels",
            "e2e",
            "--shell",
            "--",
            "echo out && exit 3",
        ],
    )
    .await;
    assert_eq!(code, 3, "the remote exit code propagates: {stdout}{stderr}");
    assert_eq!(stdout, "out\n");

    let (code, stdout, stderr) = cli(
        &server,
        &admin,
        &["invoke", "--cluster", "kind", "--", "false"],
    )
    .await;
    assert_eq!(code, 1, "`false` exits 1: {stdout}{stderr}");

    // Without --shell, shell syntax is just words.
    let (code, stdout, _) = cli(
        &server,
        &admin,
        &["invoke", "--labels", "e2e", "--", "echo", "a && b", "$HOME"],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(stdout, "a && b $HOME\n");

    let dir = scratch_dir();
    let manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo\n";
    let file = write(dir.path(), "m.yaml", manifest);
    let (code, stdout, stderr) = cli(
        &server,
        &admin,
        &[
            "invoke", "--labels", "e2e", "--file", &file, "--", "cat", "m.yaml",
        ],
    )
    .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout, manifest, "the uploaded file is in the workspace");

    // A file over the limit is refused before anything is queued.
    let before = invoke_runs(&server).await.runs.len();
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![b'x'; 1024 * 1024 + 1]).unwrap();
    let (code, _, stderr) = cli(
        &server,
        &admin,
        &[
            "invoke",
            "--labels",
            "e2e",
            "--file",
            big.to_str().unwrap(),
            "--",
            "true",
        ],
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("at most 1.0 MiB"), "{stderr}");
    assert_eq!(invoke_runs(&server).await.runs.len(), before);

    // A program that does not exist on the runner: 127, like a shell, with a hint.
    let (code, stdout, _) = cli(
        &server,
        &admin,
        &["invoke", "--labels", "e2e", "--", "no-such-program-xyz"],
    )
    .await;
    assert_eq!(code, 127, "{stdout}");
    assert!(stdout.contains("could not start"), "{stdout}");

    // A command that runs past --timeout is stopped, and exits 124 like timeout(1).
    let (code, _, stderr) = cli(
        &server,
        &admin,
        &[
            "invoke",
            "--labels",
            "e2e",
            "--timeout",
            "1s",
            "--",
            "sleep",
            "30",
        ],
    )
    .await;
    assert_eq!(code, 124, "{stderr}");
    assert!(stderr.contains("timeout of 1s"), "{stderr}");

    // Invoke runs show in `outpost runs`, with their trigger.
    let list = invoke_runs(&server).await;
    assert_eq!(list.runs.len(), 7, "one run per invoke");
    assert!(
        list.runs
            .iter()
            .all(|r| r.trigger.kind == TriggerKind::Invoke && r.pipeline == INVOKE_PIPELINE)
    );
    let (code, stdout, _) = cli(&server, &admin, &["runs"]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("invoke"), "{stdout}");
}

async fn invoke_is_refused_without_the_permission_and_audited_with_it(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[SECRETS_KEY_ENV]).await;
    server.set_secret("DEPLOY_KEY", "hunter2-xyz").await;
    let _runner = TestRunner::start(&server, "audited", &["e2e"], &[]).await;
    let trigger = server.token(Scope::Trigger).await;
    let invoker = server.token(Scope::Invoke).await;
    let admin = server.admin_token().to_string();

    for token in [&trigger, &server.token(Scope::Read).await] {
        let (code, stdout, stderr) = cli(
            &server,
            token,
            &[
                "invoke",
                "--labels",
                "e2e",
                "--",
                "touch",
                "/tmp/should-not-run",
            ],
        )
        .await;
        assert_eq!(code, 2, "{stdout}{stderr}");
        assert!(
            stderr.contains("`invoke` scope"),
            "the refusal says what is needed: {stderr}"
        );
    }
    assert!(
        invoke_runs(&server).await.runs.is_empty(),
        "a refused invoke queues nothing"
    );

    // A token with the invoke scope may; the secret in the command line stays out of the trail.
    let (code, stdout, stderr) = cli(
        &server,
        &invoker,
        &[
            "invoke",
            "--labels",
            "e2e",
            "--shell",
            "--",
            "echo",
            "--token=s3cr3t-v4lue;",
            "exit",
            "5",
        ],
    )
    .await;
    assert_eq!(code, 5, "{stdout}{stderr}");
    // A value from the secret store is masked wherever it appears in the command line.
    let (code, stdout, stderr) = cli(
        &server,
        &invoker,
        &["invoke", "--labels", "e2e", "--", "echo", "key=hunter2-xyz"],
    )
    .await;
    assert_eq!(code, 0, "{stdout}{stderr}");

    // Only admins read the trail.
    let (code, _, stderr) = cli(&server, &invoker, &["audit"]).await;
    assert_eq!(code, 2, "{stderr}");

    let (code, stdout, stderr) = cli(
        &server,
        &admin,
        &["audit", "--kind", "invoke", "-o", "json"],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let audit: AuditList = serde_json::from_str(&stdout).expect("audit -o json is the API's JSON");
    assert_eq!(audit.events.len(), 2, "{stdout}");
    assert_eq!(audit.events[0].command.as_deref(), Some("echo 'key=***'"));
    assert!(
        !stdout.contains("hunter2"),
        "a stored secret leaked: {stdout}"
    );
    let event = &audit.events[1];
    assert_eq!(event.kind, "invoke");
    assert!(event.actor.starts_with("e2e-invoke-"), "{}", event.actor);
    let command = event.command.as_deref().unwrap_or_default();
    assert!(command.contains("--token=***"), "{command}");
    assert!(
        !stdout.contains("s3cr3t"),
        "the secret leaked into the audit trail: {stdout}"
    );
    assert_eq!(event.exit_code, Some(5));
    assert_eq!(event.status, Some(JobStatus::Failed));
    assert_eq!(event.runner_name.as_deref(), Some("audited"));
    assert_eq!(event.labels, vec!["e2e".to_string()]);

    let (code, stdout, _) = cli(&server, &admin, &["audit"]).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains(&event.actor) && stdout.contains("audited"),
        "{stdout}"
    );
}

async fn ctrl_c_cancels_the_remote_command(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let runner = TestRunner::start(&server, "sleepy", &["e2e"], &[]).await;
    let admin = server.admin_token().to_string();
    let client = server.client();

    let mut cli_child = outpost(
        &server,
        &admin,
        &["invoke", "--labels", "e2e", "--", "sleep", "60"],
    )
    .spawn()
    .expect("outpost invoke starts");
    let job = eventually("the invoked command to be running", WAIT, || async {
        let runs = invoke_runs(&server).await;
        let Some(run) = runs.runs.first() else {
            return Err("no invoke run yet".to_string());
        };
        let run = client.get_run(run.id).await.map_err(|e| e.to_string())?;
        match run.jobs.first() {
            Some(j)
                if j.status == JobStatus::Running
                    && !j.steps.is_empty()
                    && j.steps[0].started_at.is_some() =>
            {
                Ok(j.clone())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(cli_child.id().expect("the CLI runs") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT is delivered");
    let code = wait_exit(&mut cli_child, "outpost invoke -- sleep 60").await;
    assert_eq!(code, 130, "Ctrl-C exits 130");

    let job = wait_for_job(&client, job.id, WAIT).await;
    assert_eq!(
        job.status,
        JobStatus::Cancelled,
        "the remote job was cancelled"
    );
    let run = client.get_run(job.run_id).await.expect("GET run");
    assert_eq!(run.status, RunStatus::Cancelled);
    drop(runner);
}

/// A browser session: the cookie and the CSRF token of the page it last loaded.
struct WebSession {
    http: reqwest::Client,
    base: String,
    cookie: String,
}

impl WebSession {
    async fn login(server: &TestServer, token: &str) -> WebSession {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a client can be built");
        let body: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("next", "/runners")
            .finish();
        let resp = http
            .post(format!("{}/login", server.url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("POST /login");
        assert_eq!(resp.status(), 303, "login succeeds");
        let cookie = resp.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        WebSession {
            http,
            base: server.url().to_string(),
            cookie,
        }
    }

    async fn page(&self, path: &str) -> String {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .expect("GET page");
        assert_eq!(resp.status(), 200, "GET {path}");
        resp.text().await.expect("page text")
    }

    /// Posts the form with the page's CSRF token; returns the status and `Location`.
    async fn post(&self, path: &str, page: &str, form: &[(&str, &str)]) -> (u16, String) {
        let at = page
            .find("name=\"csrf-token\" content=\"")
            .expect("the page carries a CSRF token")
            + 27;
        let csrf = &page[at..at + 64];
        let body: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("csrf", csrf)
            .extend_pairs(form)
            .finish();
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("POST form");
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (resp.status().as_u16(), location)
    }
}

async fn the_web_run_command_box_needs_the_permission_and_streams_the_job(backend: Backend) {
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let _runner = TestRunner::start(&server, "web-runner", &["e2e"], &[]).await;
    let client = server.client();
    let form = [
        ("labels", "e2e"),
        ("command", "echo \"web-$((2 + 3))\" && exit 7"),
        ("shell", "on"),
        ("timeout", "1m"),
    ];

    let trigger = WebSession::login(&server, &server.token(Scope::Trigger).await).await;
    let page = trigger.page("/runners").await;
    assert!(
        !page.contains("Run command"),
        "no box without the permission"
    );
    let (status, _) = trigger.post("/runners/invoke", &page, &form).await;
    assert_eq!(status, 403);
    assert!(
        invoke_runs(&server).await.runs.is_empty(),
        "nothing was queued"
    );

    let invoker = WebSession::login(&server, &server.token(Scope::Invoke).await).await;
    let page = invoker.page("/runners").await;
    assert!(page.contains("Run command"), "the box is there");
    let (status, location) = invoker.post("/runners/invoke", &page, &form).await;
    assert_eq!(status, 303, "the form redirects to the job");
    let job_id: uuid::Uuid = location
        .strip_prefix("/jobs/")
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("redirected to {location}, not a job"));
    // The job page is the live log viewer.
    let job_page = invoker.page(&location).await;
    assert!(job_page.contains(&job_id.to_string()));
    let job = wait_for_job(&client, job_id, WAIT).await;
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.exit_code, Some(7));
    let log = client.get_log(job_id, 0).await.expect("GET log");
    assert_eq!(&log[..], b"web-5\n");
    let audit = client
        .list_audit(Some("invoke"), None, None)
        .await
        .expect("GET audit");
    assert_eq!(audit.events.len(), 1);
    assert_eq!(audit.events[0].job_id, Some(job_id));
    assert_eq!(audit.events[0].exit_code, Some(7));
}

async fn login_saves_a_private_config_that_later_commands_use(backend: Backend) {
    use std::os::unix::fs::PermissionsExt as _;
    let db = test_db!(backend);
    let server = TestServer::start(&db, &[]).await;
    let _runner = TestRunner::start(&server, "seen-after-login", &["e2e"], &[]).await;
    let dir = scratch_dir();
    let config = dir.path().join("outpost").join("config.toml");
    // Only the config file: no server or token in the environment.
    let bare = |args: &[&str]| {
        let mut cmd = outpost(&server, "", args);
        cmd.env_remove("OUTPOST_SERVER")
            .env_remove("OUTPOST_TOKEN")
            .env("OUTPOST_CONFIG", &config);
        cmd
    };

    let out = finish(
        bare(&[
            "login",
            "--server",
            server.url(),
            "--token",
            "opa_not-a-token",
        ]),
        "outpost login (bad token)",
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid"));
    assert!(!config.exists(), "a refused login saves nothing");

    let token = server.token(Scope::Read).await;
    let mut login = bare(&["login", "--server", server.url()]);
    login.stdin(Stdio::piped());
    let mut child = login.spawn().expect("outpost login starts");
    {
        use tokio::io::AsyncWriteExt as _;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(format!("{token}\n").as_bytes())
            .await
            .unwrap();
    }
    assert_eq!(wait_exit(&mut child, "outpost login").await, 0);
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the config file is private");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains(&token) && text.contains(server.url()),
        "{text}"
    );

    let out = finish(bare(&["runners"]), "outpost runners").await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("seen-after-login"));

    let out = finish(bare(&["logout"]), "outpost logout").await;
    assert_eq!(out.status.code(), Some(0));
    let out = finish(bare(&["runners"]), "outpost runners after logout").await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("outpost login"));
}
