//! A real server on 127.0.0.1 over a test's store, with one job claimed by a runner: the set-up of
//! the live-log tests, which need a real TCP listener for their Server-Sent Events.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::{Client, RegisterRequest};
use outpost_server::api::{AppState, router};
use outpost_server::store::{NewRun, Scope};
use outpost_server::{Settings, Store, pipeline};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::common::{Backend, TestDb};

const PIPELINE: &str = "jobs:\n  build:\n    runs_on: [x]\n    steps:\n      - run: 'true'\n";

/// The running server and the claimed job.
pub struct ClaimedJob {
    /// The store the server serves.
    pub store: Arc<Store>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The runner that holds the job, by its runner token.
    pub runner: Client,
    /// The job.
    pub job: Uuid,
    /// The job's lease token.
    pub lease: String,
    /// An API token with the read scope.
    pub read: String,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl ClaimedJob {
    /// Opens a store on `db`, serves it and has a runner claim the one job of a new run of
    /// pipeline `name`.
    pub async fn start(db: &TestDb, name: &str) -> ClaimedJob {
        let connections = match db.backend() {
            Backend::Sqlite => 4,
            Backend::Postgres => 8,
        };
        let store = Arc::new(Store::connect(&db.url(), connections).await.unwrap());
        let settings = Arc::new(Settings {
            data_dir: db.dir().to_path_buf(),
            ..Default::default()
        });
        let shutdown = CancellationToken::new();
        let app = router(AppState {
            store: store.clone(),
            settings: settings.clone(),
            shutdown: shutdown.clone(),
            entra: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { outpost_server::serve(listener, app, &settings.server, shutdown).await }
        });

        let def = pipeline::parse(PIPELINE).unwrap();
        store.put_pipeline(name, PIPELINE, &def).await.unwrap();
        let (_, read) = store
            .create_api_token("viewer", Scope::Read, None)
            .await
            .unwrap();
        let req: RegisterRequest =
            serde_json::from_value(serde_json::json!({ "name": "r", "labels": ["x"] })).unwrap();
        let reg = store.register_runner("default", &req).await.unwrap();
        store
            .create_run(
                NewRun {
                    pipeline: name.into(),
                    trigger: Default::default(),
                    variables: Default::default(),
                },
                &def,
            )
            .await
            .unwrap();
        let runner = Client::new(&base, Some(reg.runner_token)).unwrap();
        let claim = runner
            .acquire(Duration::from_secs(5))
            .await
            .unwrap()
            .expect("the job is handed out");
        ClaimedJob {
            store,
            base,
            runner,
            job: claim.job.id,
            lease: claim.lease.token,
            read,
            shutdown,
            server,
        }
    }

    /// Stops the server, waits for it and closes the store.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.server.await.unwrap();
        self.store.close().await;
    }
}
