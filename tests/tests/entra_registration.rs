//! Runner registration with Entra ID: the real server checks tokens minted by the Entra stand-in
//! (signature against the JWKS, issuer, audience, tenant, expiry, allowed principal), and the
//! real `outpost-runner register --entra` gets its token from the identity stand-in's managed
//! identity endpoint, which mints with the Entra stand-in's keys.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use outpost_tests::entra::{EntraStandIn, now};
use outpost_tests::identity::{Endpoint, IdentityStandIn};
use outpost_tests::outpost_protocol::{RegisterRequest, RunStatus};
use outpost_tests::{
    Backend, TestServer, apply_and_trigger, backend_tests, binary, describe_run, expect_status,
    job, test_db, wait_for_run,
};

backend_tests!(
    a_valid_token_registers_into_the_principals_pool,
    refused_tokens_answer_401_and_register_nothing,
    a_rotated_key_is_fetched_on_its_unknown_kid,
    unknown_kids_do_not_make_the_server_hammer_the_issuer,
    without_entra_or_keys_a_jwt_is_refused,
    the_runner_registers_with_its_managed_identity,
);

const AUDIENCE: &str = "api://outpost-e2e";

/// Writes a server config file with an `[entra]` section for `stand_in` and returns its path.
fn write_config(
    dir: &Path,
    stand_in: &EntraStandIn,
    principals: &[(&str, &str)],
    extra: &str,
) -> PathBuf {
    let mut text = format!(
        "[entra]\ntenant_id = \"{}\"\nissuer = \"{}\"\naudience = \"{AUDIENCE}\"\n{extra}\n",
        stand_in.tenant_id(),
        stand_in.issuer(),
    );
    for (oid, pool) in principals {
        text.push_str(&format!(
            "\n[[entra.principals]]\nobject_id = \"{oid}\"\npool = \"{pool}\"\n"
        ));
    }
    let path = dir.join("outpost.toml");
    std::fs::write(&path, text).expect("the config file can be written");
    path
}

fn config_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("outpost-e2e-entra-")
        .tempdir()
        .expect("a temporary directory can be created")
}

fn register_request(name: &str, labels: &[&str]) -> RegisterRequest {
    RegisterRequest {
        name: name.to_string(),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        version: outpost_tests::outpost_protocol::VERSION.to_string(),
        os: "linux".into(),
        arch: "x86_64".into(),
        clusters: Vec::new(),
    }
}

/// Registers with `token` and expects a `401` whose message contains `why`.
async fn expect_refused(server: &TestServer, token: String, why: &str, case: &str) {
    // The server may log why, but never the token or any part of its signature.
    let signature = token.rsplit('.').next().unwrap_or_default().to_string();
    let result = server
        .client_with(Some(token))
        .register(&register_request(case, &["entra"]))
        .await;
    let message = match &result {
        Err(outpost_tests::outpost_protocol::ClientError::Api { message, .. }) => message.clone(),
        _ => String::new(),
    };
    let status = expect_status(result, case);
    assert_eq!(status.as_u16(), 401, "{case}: {message}");
    assert!(
        message.contains(why),
        "{case}: the message should say {why:?}, it says {message:?}"
    );
    assert!(
        !message.contains(&signature) && !server.output().contains(&signature),
        "{case}: the token leaked into the answer or the log"
    );
}

async fn a_valid_token_registers_into_the_principals_pool(backend: Backend) {
    let db = test_db!(backend);
    let stand_in = EntraStandIn::start().await;
    let dir = config_dir();
    let prod = "4f1c5d0e-0000-4000-8000-00000000a001";
    let dev = "4f1c5d0e-0000-4000-8000-00000000a002";
    let config = write_config(
        dir.path(),
        &stand_in,
        &[(prod, "aks-prod"), (dev, "aks-dev")],
        "",
    );
    let server = TestServer::start(&db, &[("OUTPOST_CONFIG", config.to_str().unwrap())]).await;
    let admin = server.client();

    // Unauthenticated, the server says how to register.
    let info = server
        .client_with(None)
        .registration_info()
        .await
        .expect("GET registration-info");
    let entra = info.entra.expect("Entra registration is announced");
    assert_eq!(entra.audience, AUDIENCE);
    assert_eq!(entra.scope, format!("{AUDIENCE}/.default"));
    assert_eq!(entra.tenant_id, stand_in.tenant_id());

    let token = stand_in.mint(&stand_in.claims(AUDIENCE, prod));
    let registered = server
        .client_with(Some(token))
        .register(&register_request("vmss-prod-0", &["aks-prod"]))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "registering with a valid token failed: {e}\n{}",
                server.output()
            )
        });

    // An object id in another case, a v2 token naming its client in `azp`, and a token that
    // expired 20 s ago (inside the 60 s leeway) are accepted too.
    let mut claims = stand_in.claims(AUDIENCE, &dev.to_uppercase());
    claims.appid = None;
    claims.azp = Some("a-client".into());
    claims.exp = Some(now() - 20);
    let dev_runner = server
        .client_with(Some(stand_in.mint(&claims)))
        .register(&register_request("vmss-dev-0", &["aks-dev"]))
        .await
        .expect("a token within the leeway is accepted");

    let runners = admin.list_runners().await.expect("GET runners").runners;
    let pools: Vec<(String, String)> = runners
        .iter()
        .map(|r| (r.name.clone(), r.pool.clone()))
        .collect();
    assert_eq!(
        pools,
        vec![
            ("vmss-dev-0".to_string(), "aks-dev".to_string()),
            ("vmss-prod-0".to_string(), "aks-prod".to_string()),
        ]
    );
    assert!(runners.iter().any(|r| r.id == dev_runner.runner_id));

    // The runner token works like any other: the runner acquires and completes a job.
    let run = apply_and_trigger(
        &admin,
        "entra-hello",
        "jobs:\n  hello:\n    runs_on: [aks-prod]\n    steps:\n      - run: echo hi\n",
        &[],
    )
    .await;
    let runner = server.client_with(Some(registered.runner_token));
    let acquired = runner
        .acquire(Duration::from_secs(10))
        .await
        .expect("acquire")
        .expect("the queued job is handed to the Entra-registered runner");
    assert_eq!(acquired.job.run_id, run.id);
    let status = admin.get_job(acquired.job.id).await.expect("GET job");
    assert_eq!(status.runner_id, Some(registered.runner_id));
}

async fn refused_tokens_answer_401_and_register_nothing(backend: Backend) {
    let db = test_db!(backend);
    let stand_in = EntraStandIn::start().await;
    let dir = config_dir();
    let allowed = "6a3e0f00-0000-4000-8000-00000000b001";
    let config = write_config(dir.path(), &stand_in, &[(allowed, "aks-prod")], "");
    let server = TestServer::start(&db, &[("OUTPOST_CONFIG", config.to_str().unwrap())]).await;
    let good = || stand_in.claims(AUDIENCE, allowed);

    let forged = stand_in.mint_forged(&good());
    expect_refused(
        &server,
        forged,
        "signature does not verify",
        "forged signature",
    )
    .await;

    let mut c = good();
    c.exp = Some(now() - 600);
    c.iat = Some(now() - 4200);
    c.nbf = Some(now() - 4200);
    expect_refused(&server, stand_in.mint(&c), "expired", "expired").await;

    let mut c = good();
    c.nbf = Some(now() + 600);
    expect_refused(&server, stand_in.mint(&c), "not valid yet", "not yet valid").await;

    let mut c = good();
    c.aud = Some("api://someone-else".into());
    expect_refused(&server, stand_in.mint(&c), "audience", "wrong audience").await;

    let mut c = good();
    c.iss = Some(format!("https://sts.windows.net/{}/", stand_in.tenant_id()));
    expect_refused(&server, stand_in.mint(&c), "issuer", "wrong issuer").await;

    let mut c = good();
    c.tid = Some("72f988bf-86f1-41af-91ab-2d7cd011db47".into());
    expect_refused(&server, stand_in.mint(&c), "tenant", "wrong tenant").await;

    let mut c = good();
    c.tid = None;
    expect_refused(&server, stand_in.mint(&c), "tenant", "no tenant").await;

    let stranger = "0badc0de-0000-4000-8000-00000000b002";
    let c = stand_in.claims(AUDIENCE, stranger);
    expect_refused(
        &server,
        stand_in.mint(&c),
        &format!("principal {stranger} is not allowed"),
        "principal not allowed",
    )
    .await;

    let mut c = good();
    c.exp = None;
    expect_refused(&server, stand_in.mint(&c), "no `exp` claim", "no expiry").await;

    let unknown = stand_in.mint_with_unknown_kid(&good());
    expect_refused(&server, unknown, "does not publish", "unknown kid").await;

    // An HS256 token "signed" with the issuer's public key (algorithm confusion) and an
    // unsigned one are refused before any key is consulted.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(stand_in.current_kid());
    let hs = jsonwebtoken::encode(
        &header,
        &good(),
        &jsonwebtoken::EncodingKey::from_secret(b"public-key-bytes").unwrap(),
    )
    .unwrap();
    expect_refused(&server, hs, "only RS256", "HS256").await;

    let runners = server.client().list_runners().await.expect("GET runners");
    assert!(
        runners.runners.is_empty(),
        "no refused token may register a runner: {:?}",
        runners.runners
    );
    // The server logs why, without the token.
    let log = server.output();
    assert!(
        log.contains("refused an Entra ID registration"),
        "the server logs refusals:\n{log}"
    );

    // The control: the good claims pass, so each refusal above was for its one changed claim.
    let ok = server
        .client_with(Some(stand_in.mint(&good())))
        .register(&register_request("control", &["entra"]))
        .await;
    assert!(ok.is_ok(), "the unchanged claims are accepted: {ok:?}");
}

async fn a_rotated_key_is_fetched_on_its_unknown_kid(backend: Backend) {
    let db = test_db!(backend);
    let stand_in = EntraStandIn::start().await;
    let dir = config_dir();
    let oid = "9d7e0000-0000-4000-8000-00000000c001";
    // Refetching on an unknown kid is allowed at once here; the default waits a minute.
    let config = write_config(
        dir.path(),
        &stand_in,
        &[(oid, "aks-prod")],
        "jwks_min_refresh_secs = 0",
    );
    let server = TestServer::start(&db, &[("OUTPOST_CONFIG", config.to_str().unwrap())]).await;

    let first = stand_in.mint(&stand_in.claims(AUDIENCE, oid));
    server
        .client_with(Some(first.clone()))
        .register(&register_request("before-rotation", &[]))
        .await
        .expect("registering before the rotation");
    assert_eq!(
        stand_in.discovery_fetches(),
        1,
        "the JWKS URL is discovered"
    );
    assert_eq!(stand_in.jwks_fetches(), 1);

    // A second registration is checked against the cached keys.
    server
        .client_with(Some(first))
        .register(&register_request("cached", &[]))
        .await
        .expect("registering with the cached keys");
    assert_eq!(stand_in.jwks_fetches(), 1, "the keys are cached");

    let old_kid = stand_in.current_kid();
    let new_kid = stand_in.rotate_keys();
    assert_ne!(old_kid, new_kid);
    let rotated = stand_in.mint(&stand_in.claims(AUDIENCE, oid));
    let header = jsonwebtoken::decode_header(&rotated).unwrap();
    assert_eq!(header.kid.as_deref(), Some(new_kid.as_str()));
    server
        .client_with(Some(rotated))
        .register(&register_request("after-rotation", &[]))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "a token signed with the rotated key is accepted after a refetch: {e}\n{}",
                server.output()
            )
        });
    assert_eq!(
        stand_in.jwks_fetches(),
        2,
        "the unknown kid made the server fetch the keys again"
    );
    let names: Vec<String> = server
        .client()
        .list_runners()
        .await
        .expect("GET runners")
        .runners
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec!["after-rotation", "before-rotation", "cached"]);
}

async fn unknown_kids_do_not_make_the_server_hammer_the_issuer(backend: Backend) {
    let db = test_db!(backend);
    let stand_in = EntraStandIn::start().await;
    let dir = config_dir();
    let oid = "9d7e0000-0000-4000-8000-00000000d001";
    // An explicit JWKS URL: no discovery.
    let extra = format!("jwks_url = \"{}\"", stand_in.jwks_url());
    let config = write_config(dir.path(), &stand_in, &[(oid, "aks-prod")], &extra);
    let server = TestServer::start(&db, &[("OUTPOST_CONFIG", config.to_str().unwrap())]).await;

    server
        .client_with(Some(stand_in.mint(&stand_in.claims(AUDIENCE, oid))))
        .register(&register_request("first", &[]))
        .await
        .expect("registering");
    assert_eq!(stand_in.jwks_fetches(), 1);
    assert_eq!(stand_in.discovery_fetches(), 0, "jwks_url skips discovery");
    for i in 0..5 {
        let token = stand_in.mint_with_unknown_kid(&stand_in.claims(AUDIENCE, oid));
        expect_refused(
            &server,
            token,
            "does not publish",
            &format!("made-up kid {i}"),
        )
        .await;
    }
    assert_eq!(
        stand_in.jwks_fetches(),
        1,
        "within jwks_min_refresh_secs, made-up kids cause no fetch"
    );
}

async fn without_entra_or_keys_a_jwt_is_refused(backend: Backend) {
    let db = test_db!(backend);
    let stand_in = EntraStandIn::start().await;
    let oid = "9d7e0000-0000-4000-8000-00000000e001";
    let token = stand_in.mint(&stand_in.claims(AUDIENCE, oid));

    // A server without [entra] announces nothing and refuses JWTs.
    let plain = TestServer::start(&db, &[]).await;
    let info = plain.client_with(None).registration_info().await.unwrap();
    assert_eq!(info.entra, None);
    expect_refused(
        &plain,
        token.clone(),
        "does not accept Entra ID tokens",
        "entra not configured",
    )
    .await;
    // Registration tokens still work next to it.
    plain.fake_runner("with-a-token", &["x"]).await;
    // The runner is told, before it asks its managed identity for anything.
    let identity = IdentityStandIn::start().await;
    identity.set_minter(stand_in.managed_identity_minter());
    let dir = config_dir();
    let (ok, stderr) = runner_cli(
        &[
            "register",
            "--server",
            plain.url(),
            "--entra",
            "--name",
            "vm",
            "--config-dir",
            dir.path().to_str().unwrap(),
        ],
        &identity.env(),
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("does not accept Entra ID registration") && stderr.contains("--token"),
        "{stderr}"
    );
    assert!(identity.requests().is_empty());
    drop(plain);

    // A server whose key URL does not answer cannot check the token: 503, not a runner.
    let db = test_db!(backend);
    let dir = config_dir();
    let config = write_config(
        dir.path(),
        &stand_in,
        &[(oid, "aks-prod")],
        "jwks_url = \"http://127.0.0.1:1/keys\"",
    );
    let server = TestServer::start(&db, &[("OUTPOST_CONFIG", config.to_str().unwrap())]).await;
    let result = server
        .client_with(Some(token))
        .register(&register_request("no-keys", &[]))
        .await;
    let status = expect_status(result, "unreachable keys");
    assert_eq!(status.as_u16(), 503);
    let log = server.output();
    assert!(
        log.contains("could not fetch the issuer's signing keys: http://127.0.0.1:1/keys"),
        "the server logs why it could not check the token:\n{log}"
    );
    assert!(
        server
            .client()
            .list_runners()
            .await
            .unwrap()
            .runners
            .is_empty()
    );
}

/// Runs `outpost-runner ARGS` with `env` (and no inherited `OUTPOST*` or identity variables);
/// returns whether it succeeded and its stderr.
async fn runner_cli(args: &[&str], env: &[(String, String)]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(binary("outpost-runner"));
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("OUTPOST")
            || key_text.starts_with("IDENTITY_")
            || key_text.starts_with("MSI_")
        {
            cmd.env_remove(&key);
        }
    }
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("outpost-runner register finishes within a minute")
        .expect("outpost-runner runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn the_runner_registers_with_its_managed_identity(backend: Backend) {
    let db = test_db!(backend);
    let stand_in = EntraStandIn::start().await;
    let (ua_client, ua_object) = stand_in.add_user_assigned_identity();
    let (stranger_client, _) = stand_in.add_user_assigned_identity();
    let dir = config_dir();
    let config = write_config(
        dir.path(),
        &stand_in,
        &[
            (stand_in.system_assigned_object_id(), "vmss-system"),
            (&ua_object, "vmss-user"),
        ],
        "",
    );
    let server = TestServer::start(&db, &[("OUTPOST_CONFIG", config.to_str().unwrap())]).await;
    // The runner's managed identity endpoint hands out tokens the Entra ID stand-in signed.
    let identity = IdentityStandIn::start().await;
    identity.set_minter(stand_in.managed_identity_minter());
    let identity_env = identity.env();

    // The system-assigned identity, with the audience taken from the server.
    let system_dir = config_dir();
    let (ok, stderr) = runner_cli(
        &[
            "register",
            "--server",
            server.url(),
            "--entra",
            "--name",
            "vm-system",
            "--labels",
            "entra-e2e",
            "--config-dir",
            system_dir.path().to_str().unwrap(),
        ],
        &identity_env,
    )
    .await;
    assert!(
        ok,
        "register --entra failed:\n{stderr}\n{}",
        server.output()
    );
    assert!(
        system_dir.path().join("credentials.json").is_file(),
        "{stderr}"
    );

    // A user-assigned identity, with the scope given on the command line.
    let user_dir = config_dir();
    let scope = format!("{AUDIENCE}/.default");
    let (ok, stderr) = runner_cli(
        &[
            "register",
            "--server",
            server.url(),
            "--entra",
            "--client-id",
            &ua_client,
            "--scope",
            &scope,
            "--name",
            "vm-user",
            "--config-dir",
            user_dir.path().to_str().unwrap(),
        ],
        &identity_env,
    )
    .await;
    assert!(ok, "register --entra --client-id failed:\n{stderr}");

    // An identity the server does not list is refused, and the runner says what to do.
    let stranger_dir = config_dir();
    let (ok, stderr) = runner_cli(
        &[
            "register",
            "--server",
            server.url(),
            "--entra",
            "--client-id",
            &stranger_client,
            "--name",
            "vm-stranger",
            "--config-dir",
            stranger_dir.path().to_str().unwrap(),
        ],
        &identity_env,
    )
    .await;
    assert!(!ok, "an unlisted identity must not register");
    assert!(
        stderr.contains("is not allowed to register runners")
            && stderr.contains("[[entra.principals]]"),
        "{stderr}"
    );
    assert!(!stranger_dir.path().join("credentials.json").exists());

    // Every token came from the stand-in's endpoint, asked the App Service way, for the server's
    // audience.
    // The endpoint answers 200 only with the right X-IDENTITY-HEADER and api-version.
    let requests = identity.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    for r in &requests {
        assert_eq!(r.endpoint, Endpoint::ManagedIdentity, "{r:?}");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.audience, AUDIENCE);
    }
    assert_eq!(requests[0].client_id, None);
    assert_eq!(requests[1].client_id.as_deref(), Some(ua_client.as_str()));

    let admin = server.client();
    let runners = admin.list_runners().await.expect("GET runners").runners;
    let pools: Vec<(String, String)> = runners
        .iter()
        .map(|r| (r.name.clone(), r.pool.clone()))
        .collect();
    assert_eq!(
        pools,
        vec![
            ("vm-system".to_string(), "vmss-system".to_string()),
            ("vm-user".to_string(), "vmss-user".to_string()),
        ]
    );

    // The registered runner runs a job with the credentials it saved.
    let work = config_dir();
    let mut run = tokio::process::Command::new(binary("outpost-runner"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OUTPOST") {
            run.env_remove(&key);
        }
    }
    run.args(["run", "--once", "--config-dir"])
        .arg(system_dir.path())
        .env("OUTPOST_RUNNER__WORK_DIR", work.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = run.spawn().expect("outpost-runner run starts");
    let pipeline =
        "jobs:\n  hello:\n    runs_on: [entra-e2e]\n    steps:\n      - run: echo from-entra\n";
    let started = apply_and_trigger(&admin, "entra-runner", pipeline, &[]).await;
    let done = wait_for_run(&admin, started.id, Duration::from_secs(60)).await;
    assert_eq!(done.status, RunStatus::Succeeded, "{}", describe_run(&done));
    let system_id = runners.iter().find(|r| r.name == "vm-system").unwrap().id;
    assert_eq!(job(&done, "hello").runner_id, Some(system_id));
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the --once runner exits after its job")
        .expect("outpost-runner run exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
