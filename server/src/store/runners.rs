//! Runners: registration, authentication by runner token, and their derived state.

use chrono::{DateTime, Utc};
use outpost_protocol::{RegisterRequest, RegisterResponse, Runner, RunnerState};
use sqlx::types::Json;
use uuid::Uuid;

use super::{Store, StoreResult, dispatch, hash_token, new_token, with_writer};

/// The runner behind a valid runner token.
#[derive(Debug, Clone)]
pub struct RunnerPrincipal {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: Vec<String>,
}

#[derive(sqlx::FromRow)]
struct RunnerRow {
    id: Uuid,
    name: String,
    labels: Json<Vec<String>>,
    pool: String,
    version: String,
    os: String,
    arch: String,
    draining: bool,
    created_at: DateTime<Utc>,
    last_seen_at: Option<DateTime<Utc>>,
    current_job: Option<Uuid>,
}

/// How long a runner's authentication is answered from memory before `last_seen_at` is written again.
pub const SEEN_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// Recently authenticated runners by token hash.
#[derive(Debug, Default)]
pub struct RunnerCache {
    entries:
        std::sync::Mutex<std::collections::HashMap<String, (RunnerPrincipal, std::time::Instant)>>,
}

impl RunnerCache {
    fn fresh(&self, hash: &str) -> Option<RunnerPrincipal> {
        let map = self.entries.lock().expect("runner cache poisoned");
        map.get(hash)
            .filter(|(_, at)| at.elapsed() < SEEN_REFRESH)
            .map(|(p, _)| p.clone())
    }

    fn insert(&self, hash: String, principal: RunnerPrincipal) {
        let mut map = self.entries.lock().expect("runner cache poisoned");
        // Forget runners that stopped calling, so the map stays as small as the live fleet.
        if map.len() > 1024 {
            map.retain(|_, (_, at)| at.elapsed() < SEEN_REFRESH);
        }
        map.insert(hash, (principal, std::time::Instant::now()));
    }
}

/// A runner not seen for this long is shown offline (a long poll renews it at least every ~30 s).
const OFFLINE_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(90);

impl Store {
    /// Registers a runner in `pool`; returns its id and fresh token (stored only as a hash).
    pub async fn register_runner(
        &self,
        pool_name: &str,
        req: &RegisterRequest,
    ) -> StoreResult<RegisterResponse> {
        let id = Uuid::now_v7();
        let token = new_token("opn_");
        let now = Utc::now();
        // A runner's clusters are implicit labels, so the claim query routes a job that names a
        // cluster (and therefore requires `cluster:NAME`) without knowing about clusters.
        let mut labels = req.labels.clone();
        for cluster in &req.clusters {
            let label = cluster_label(cluster);
            if !labels.contains(&label) {
                labels.push(label);
            }
        }
        let mut w = self.writer().await?;
        with_writer!(w, db => {
            sqlx::query(
                "INSERT INTO runners (id, name, labels, pool, version, os, arch, token_hash, created_at, last_seen_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
            )
            .bind(id)
            .bind(&req.name)
            .bind(Json(&labels))
            .bind(pool_name)
            .bind(&req.version)
            .bind(&req.os)
            .bind(&req.arch)
            .bind(hash_token(&token))
            .bind(now)
            .execute(db)
            .await?;
        });
        Ok(RegisterResponse {
            runner_id: id,
            runner_token: token,
        })
    }

    /// The runner behind a runner token; also records that it was seen.
    ///
    /// Runners call on every long poll, so a runner seen within [`SEEN_REFRESH`] is answered from
    /// memory: acquiring a job costs no extra write. `last_seen_at` is therefore accurate to
    /// within that interval, far inside the offline threshold.
    pub async fn authenticate_runner(&self, token: &str) -> StoreResult<Option<RunnerPrincipal>> {
        let hash = hash_token(token);
        if let Some(p) = self.runner_cache.fresh(&hash) {
            return Ok(Some(p));
        }
        let mut w = self.writer().await?;
        let row: Option<(Uuid, String, Json<Vec<String>>)> = with_writer!(w, db => {
            sqlx::query_as(
                "UPDATE runners SET last_seen_at = $2 WHERE token_hash = $1 RETURNING id, name, labels",
            )
            .bind(&hash)
            .bind(Utc::now())
            .fetch_optional(db)
            .await?
        });
        let principal = row.map(|(id, name, labels)| RunnerPrincipal {
            id,
            name,
            labels: labels.0,
        });
        if let Some(p) = &principal {
            self.runner_cache.insert(hash, p.clone());
        }
        Ok(principal)
    }

    /// All runners by name, with their derived state.
    pub async fn list_runners(&self) -> StoreResult<Vec<Runner>> {
        let rows: Vec<RunnerRow> = dispatch!(self, pool => {
            sqlx::query_as(
                "SELECT r.id, r.name, r.labels, r.pool, r.version, r.os, r.arch, r.draining, r.created_at, r.last_seen_at, \
                 (SELECT j.id FROM jobs j WHERE j.runner_id = r.id AND j.status = 'running' LIMIT 1) AS current_job \
                 FROM runners r ORDER BY r.name, r.id",
            )
            .fetch_all(pool)
            .await?
        });
        let now = Utc::now();
        Ok(rows
            .into_iter()
            .map(|r| {
                let state = if r.current_job.is_some() {
                    if r.draining {
                        RunnerState::Draining
                    } else {
                        RunnerState::Busy
                    }
                } else if r.last_seen_at.is_none_or(|t| now - t > OFFLINE_AFTER) {
                    RunnerState::Offline
                } else if r.draining {
                    RunnerState::Draining
                } else {
                    RunnerState::Idle
                };
                Runner {
                    id: r.id,
                    name: r.name,
                    labels: r.labels.0,
                    pool: r.pool,
                    version: r.version,
                    os: r.os,
                    arch: r.arch,
                    state,
                    current_job: r.current_job,
                    last_seen_at: r.last_seen_at,
                    created_at: r.created_at,
                }
            })
            .collect())
    }
}

/// The implicit label of a runner that has cluster `name` configured; a job naming the cluster
/// requires it.
pub fn cluster_label(name: &str) -> String {
    format!("cluster:{name}")
}
