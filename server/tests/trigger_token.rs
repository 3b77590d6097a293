//! A trigger through the API by a token this replica has seen valid before is not checked in a
//! round trip of its own: the statement that creates the run checks it (`Store::trigger_run_as`).
//! That must never let a revoked or expired token start anything, nor learn anything, even when
//! the revocation went through another process (here: a second store on the same database, as
//! `outpost-server token revoke` is), on SQLite and PostgreSQL.

#[macro_use]
mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::Backend;
use outpost_protocol::Run;
use outpost_server::Store;
use outpost_server::api::{AppState, router};
use outpost_server::store::Scope;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

async fn apply(store: &Store, job: &str) {
    let yaml = format!("jobs:\n  {job}: {{ runs_on: [x], steps: [{{ run: 'true' }}] }}\n");
    let def = outpost_server::pipeline::parse(&yaml).unwrap();
    store.put_pipeline("p", &yaml, &def).await.unwrap();
}

/// `POST /api/v1/pipelines/{pipeline}/runs` through the router of a server on `state`.
async fn trigger(
    state: &AppState,
    token: &str,
    pipeline: &str,
    body: &'static str,
) -> (StatusCode, Option<Run>) {
    let req = Request::post(format!("/api/v1/pipelines/{pipeline}/runs"))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap();
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).ok())
}

async fn run_count(store: &Store) -> usize {
    store
        .list_runs(Some("p"), None, 100, None)
        .await
        .unwrap()
        .runs
        .len()
}

async fn revocation_elsewhere_stops_a_known_token(backend: Backend) {
    let db = test_db!(backend);
    let here = db.open().await;
    let other = db.open().await;
    let state = AppState {
        store: here.clone(),
        settings: Arc::new(db.settings()),
        shutdown: CancellationToken::new(),
        entra: None,
    };
    apply(&other, "first").await;
    let token =
        async |name: &str, scope| other.create_api_token(name, scope, None).await.unwrap().1;
    let alice = token("alice", Scope::Trigger).await;
    let bob = token("bob", Scope::Trigger).await;
    let reader = token("reader", Scope::Read).await;

    // The first trigger checks the token on its own; the next ones in the run's statement.
    assert!(here.known_api_token(&alice).is_none());
    for number in 1..=2 {
        let (status, run) = trigger(&state, &alice, "p", "{}").await;
        let run = run.expect("a run");
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(run.number, number);
        assert_eq!(run.trigger.actor.as_deref(), Some("alice"));
        assert!(here.known_api_token(&alice).is_some());
    }
    let (status, _) = trigger(&state, &bob, "p", "").await;
    assert_eq!(status, StatusCode::CREATED);

    // A scope too small is refused the first time and once the token is known.
    for _ in 0..2 {
        assert_eq!(
            trigger(&state, &reader, "p", "{}").await.0,
            StatusCode::FORBIDDEN
        );
    }
    // A bad request by a known, valid token is answered as such.
    assert_eq!(
        trigger(&state, &alice, "p", r#"{"variables": {"1x": "y"}}"#)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );

    // Applied again elsewhere: a known token's run is made from the new definition.
    apply(&other, "second").await;
    let (status, run) = trigger(&state, &alice, "p", "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    let run = run.expect("a run");
    assert_eq!((run.number, run.jobs[0].name.as_str()), (4, "second"));
    assert_eq!(run_count(&here).await, 4);

    // Revoked through the other store: this replica still knows both tokens, and neither starts
    // anything or learns whether a pipeline exists or a body is valid.
    assert_eq!(other.revoke_api_token("alice").await.unwrap(), 1);
    assert_eq!(other.revoke_api_token("bob").await.unwrap(), 1);
    assert!(here.known_api_token(&alice).is_some() && here.known_api_token(&bob).is_some());
    assert_eq!(
        trigger(&state, &alice, "p", "{}").await.0,
        StatusCode::UNAUTHORIZED,
        "a token revoked elsewhere must not start a run"
    );
    assert!(
        here.known_api_token(&alice).is_none(),
        "a refused token is forgotten"
    );
    assert_eq!(
        trigger(&state, &bob, "nope", "{}").await.0,
        StatusCode::UNAUTHORIZED,
        "a revoked token is not told that a pipeline does not exist"
    );
    assert_eq!(
        trigger(&state, &alice, "p", "{}").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(run_count(&here).await, 4);

    // Expired while known (its expiry moved into the past behind the stores' back): refused as
    // well.
    let carol = token("carol", Scope::Trigger).await;
    assert_eq!(
        trigger(&state, &carol, "p", "{}").await.0,
        StatusCode::CREATED
    );
    execute!(
        other,
        sqlx::query("UPDATE api_tokens SET expires_at = $1 WHERE name = 'carol'")
            .bind(chrono::Utc::now() - chrono::Duration::seconds(1))
    );
    assert!(here.known_api_token(&carol).is_some());
    assert_eq!(
        trigger(&state, &carol, "p", "{}").await.0,
        StatusCode::UNAUTHORIZED,
        "an expired token must not start a run"
    );
    assert_eq!(run_count(&here).await, 5);
}

backend_tests!(revocation_elsewhere_stops_a_known_token);
