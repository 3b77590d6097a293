//! Web UI handler tests: the real router over a real SQLite store, driven with `oneshot`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use outpost_server::api::{AppState, router};
use outpost_server::store::Scope;
use outpost_server::{Settings, Store};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const PIPELINE: &str = "description: Deploy <b>it</b>\njobs:\n  build:\n    runs_on: [x]\n    steps:\n      - run: echo '<script>alert(1)</script>'\n";

struct Env {
    _dir: tempfile::TempDir,
    state: AppState,
    admin: String,
    read: String,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let store = Arc::new(Store::connect(&settings.database_url(), 4).await.unwrap());
    let (_, admin) = store
        .create_api_token("admin", Scope::Admin, None)
        .await
        .unwrap();
    let (_, read) = store
        .create_api_token("reader", Scope::Read, None)
        .await
        .unwrap();
    let env = Env {
        _dir: dir,
        state: AppState {
            store,
            settings: Arc::new(settings),
            shutdown: CancellationToken::new(),
            entra: None,
        },
        admin,
        read,
    };
    let (status, _, _) = env
        .send(
            Request::put("/api/v1/pipelines/web")
                .header(header::AUTHORIZATION, format!("Bearer {}", env.admin))
                .body(Body::from(PIPELINE))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    env
}

impl Env {
    async fn send(&self, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let resp = router(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    /// Signs in with `token` and returns the `Cookie` header value for the session.
    async fn login(&self, token: &str) -> String {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("next", "/pipelines")
            .finish();
        let (status, headers, _) = self
            .send(
                Request::post("/login")
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(headers[header::LOCATION], "/pipelines");
        let set = headers[header::SET_COOKIE].to_str().unwrap().to_string();
        set.split(';').next().unwrap().to_string()
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> (StatusCode, HeaderMap, String) {
        let mut req = Request::get(path);
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        self.send(req.body(Body::empty()).unwrap()).await
    }

    async fn post_form(&self, path: &str, cookie: &str, form: &[(&str, &str)]) -> StatusCode {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        self.send(
            Request::post(path)
                .header(header::COOKIE, cookie)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .0
    }
}

/// The CSRF token a page carries in its `<meta name="csrf-token">`.
fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf-token\" content=\"").unwrap() + 27;
    page[at..at + 64].to_string()
}

#[tokio::test]
async fn login_sets_an_http_only_same_site_cookie_and_rejects_a_bad_token() {
    let env = env().await;
    let body = "token=opa_wrong&next=%2F";
    let (status, headers, page) = env
        .send(
            Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.get(header::SET_COOKIE).is_none());
    assert!(page.contains("not valid"));

    let resp = router(env.state.clone())
        .oneshot(
            Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(format!(
                    "token={}&next=//evil.example",
                    env.admin
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[header::LOCATION], "/", "no open redirect");
    let cookie = resp.headers()[header::SET_COOKIE].to_str().unwrap();
    assert!(cookie.starts_with("outpost_session="), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Lax"), "{cookie}");
    assert!(
        !cookie.contains(&env.admin),
        "the token is not readable in the cookie"
    );
    assert!(!cookie.contains("Secure"), "plain HTTP on a laptop");

    let resp = router(env.state.clone())
        .oneshot(
            Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header("x-forwarded-proto", "https")
                .body(Body::from(format!("token={}", env.admin)))
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(
        resp.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );
}

#[tokio::test]
async fn pages_need_a_session_and_carry_a_strict_csp() {
    let env = env().await;
    for path in ["/", "/pipelines", "/pipelines/web", "/runners"] {
        let (status, headers, _) = env.get(path, None).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{path}");
        assert!(
            headers[header::LOCATION]
                .to_str()
                .unwrap()
                .starts_with("/login?next="),
            "{path}"
        );
    }
    let (status, _, _) = env.get("/", Some("outpost_session=forged")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);

    let cookie = env.login(&env.admin).await;
    for path in ["/", "/pipelines", "/pipelines/web", "/runners", "/webhooks"] {
        let (status, headers, page) = env.get(path, Some(&cookie)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("default-src 'self'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(!page.contains("<script>"), "no inline script on {path}");
    }
    let (status, headers, js) = env.get("/static/app.js", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("max-age=31536000")
    );
    assert!(js.contains("textContent"));

    // The same session reads the JSON API, as the page script does.
    let (status, _, body) = env.get("/api/v1/pipelines", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_read_token_sees_no_run_or_cancel_and_is_refused() {
    let env = env().await;
    let cookie = env.login(&env.read).await;
    let (status, _, page) = env.get("/pipelines/web", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!page.contains("/pipelines/web/run\""), "no Run form");
    let token = csrf(&page);
    let status = env
        .post_form("/pipelines/web/run", &cookie, &[("csrf", &token)])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = env.get("/webhooks", Some(&cookie)).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "webhook deliveries are for admins"
    );

    // A run started by someone else shows no Cancel or Re-run to the reader either.
    let admin = env.login(&env.admin).await;
    let (_, _, page) = env.get("/pipelines/web", Some(&admin)).await;
    let status = env
        .post_form("/pipelines/web/run", &admin, &[("csrf", &csrf(&page))])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let runs = env
        .state
        .store
        .list_runs(None, None, 10, None)
        .await
        .unwrap();
    let run = env.state.store.get_run(runs.runs[0].id).await.unwrap();
    let (_, _, page) = env.get(&format!("/runs/{}", run.id), Some(&cookie)).await;
    assert!(!page.contains("Cancel run") && !page.contains("Re-run"));
    let (_, _, page) = env
        .get(&format!("/jobs/{}", run.jobs[0].id), Some(&cookie))
        .await;
    assert!(!page.contains("Cancel job"));
    let status = env
        .post_form(
            &format!("/runs/{}/cancel", run.id),
            &cookie,
            &[("csrf", &token)],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, _, page) = env.get(&format!("/runs/{}", run.id), Some(&admin)).await;
    assert!(page.contains("Cancel run") && page.contains("Re-run"));
}

#[tokio::test]
async fn state_changes_without_the_csrf_token_are_refused() {
    let env = env().await;
    let cookie = env.login(&env.admin).await;
    let status = env.post_form("/pipelines/web/run", &cookie, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let status = env
        .post_form("/pipelines/web/run", &cookie, &[("csrf", "00")])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        env.state
            .store
            .list_runs(None, None, 10, None)
            .await
            .unwrap()
            .runs
            .is_empty()
    );

    // The JSON API with only the cookie: reads are fine, writes need X-CSRF-Token.
    let call = |token: Option<String>| {
        let mut req = Request::post("/api/v1/pipelines/web/runs").header(header::COOKIE, &cookie);
        if let Some(t) = token {
            req = req.header("x-csrf-token", t);
        }
        env.send(req.body(Body::empty()).unwrap())
    };
    assert_eq!(call(None).await.0, StatusCode::FORBIDDEN);
    let (_, _, page) = env.get("/", Some(&cookie)).await;
    let (status, _, body) = call(Some(csrf(&page))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let status = env.post_form("/logout", &cookie, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn user_text_is_escaped() {
    let env = env().await;
    let cookie = env.login(&env.admin).await;
    let (_, _, page) = env.get("/pipelines/web", Some(&cookie)).await;
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(page.contains("Deploy &lt;b&gt;it&lt;/b&gt;"));
    assert!(!page.contains("<script>alert"));
    let status = env
        .post_form(
            "/pipelines/web/run",
            &cookie,
            &[
                ("csrf", &csrf(&page)),
                ("ref", "<script>alert(2)</script>"),
                ("variables", "GREETING=<img src=x onerror=alert(3)>"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let run = &env
        .state
        .store
        .list_runs(None, None, 1, None)
        .await
        .unwrap()
        .runs[0];
    let (_, _, page) = env.get(&format!("/runs/{}", run.id), Some(&cookie)).await;
    assert!(page.contains("&lt;script&gt;alert(2)&lt;/script&gt;"));
    assert!(page.contains("&lt;img src=x onerror=alert(3)&gt;"));
    assert!(!page.contains("<script>alert") && !page.contains("<img"));
    let (_, _, list) = env.get("/", Some(&cookie)).await;
    assert!(!list.contains("<script>alert") && list.contains("&lt;script&gt;alert(2)"));
}
