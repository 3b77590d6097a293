//! Ad-hoc commands (`outpost invoke`) and the audit trail that records each of them.
//!
//! An invoke is an ordinary run with one job, filed under the reserved pipeline name
//! [`INVOKE_PIPELINE`], so that everything that lists, follows, cancels and reaps runs works on
//! it unchanged.
//! The audit record names the job; the runner, status and exit code are read from the job when
//! the record is listed, so they are never stale and need no extra write on completion.

use chrono::{DateTime, Utc};
use outpost_protocol::{AuditEvent, AuditList, INVOKE_PIPELINE, JobStatus, Run};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use super::{NewRun, Store, StoreError, StoreResult, dispatch, with_writer};
use crate::pipeline::{JobDef, PipelineDef};

/// The action recorded for an invoke.
pub const AUDIT_INVOKE: &str = "invoke";

/// An ad-hoc command to queue.
#[derive(Debug, Clone)]
pub struct NewInvoke {
    /// What starts the run (kind `invoke`, actor, source).
    pub run: NewRun,
    /// The job: one step, labels, cluster, timeout.
    pub job: JobDef,
    /// The caller's token id, for the audit record.
    pub actor_id: Uuid,
    /// The command line as the audit trail keeps it, secrets masked.
    pub masked_command: String,
    /// The names of the uploaded files.
    pub files: Vec<String>,
}

/// What an invoke audit record keeps beyond its columns.
#[derive(Debug, Default, Serialize, Deserialize)]
struct InvokeDetail {
    #[serde(default)]
    actor_id: Option<Uuid>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    run_id: Option<Uuid>,
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    files: Vec<String>,
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: Uuid,
    actor: String,
    action: String,
    detail: Json<InvokeDetail>,
    created_at: DateTime<Utc>,
    job_id: Option<Uuid>,
    runner_id: Option<Uuid>,
    runner_name: Option<String>,
    status: Option<String>,
    exit_code: Option<i32>,
}

/// Secret values shorter than this are not masked: they would mask ordinary words.
const MIN_MASKED_LEN: usize = 4;

/// `text` with every occurrence of each value replaced by `***`.
fn mask_values(text: &str, values: &[String]) -> String {
    let mut text = text.to_string();
    for v in values {
        if text.contains(v.as_str()) {
            text = text.replace(v.as_str(), "***");
        }
    }
    text
}

impl Store {
    /// Queues an ad-hoc command as a one-job run and writes its audit record.
    ///
    /// The run and the record are written by separate statements; if the record cannot be
    /// written, the run is cancelled again, so no command runs unaudited.
    pub async fn create_invoke(&self, mut new: NewInvoke) -> StoreResult<Run> {
        // Values from the secret store are masked too, wherever they appear in the command.
        let secrets = self.secret_values().await?;
        new.masked_command = mask_values(&new.masked_command, &secrets);
        for step in &mut new.job.steps {
            step.name = mask_values(&step.name, &secrets);
        }
        let def = PipelineDef {
            description: None,
            repository: None,
            triggers: Vec::new(),
            variables: Default::default(),
            secrets: Vec::new(),
            jobs: vec![new.job.clone()],
        };
        let mut run_new = new.run;
        run_new.pipeline = INVOKE_PIPELINE.to_string();
        let actor = run_new.trigger.actor.clone().unwrap_or_default();
        let run = self.create_run(run_new, &def).await?;
        let job_id = run.jobs.first().map(|j| j.id);
        let detail = InvokeDetail {
            actor_id: Some(new.actor_id),
            command: Some(new.masked_command),
            run_id: Some(run.id),
            cluster: new.job.cluster.clone(),
            labels: new.job.runs_on.clone(),
            files: new.files,
        };
        let recorded = self
            .record_audit(&actor, AUDIT_INVOKE, &run.id.to_string(), job_id, &detail)
            .await;
        if let Err(e) = recorded {
            tracing::error!(run.id = %run.id, error = %e, "could not write the audit record of an invoke; cancelling it");
            let _ = self.cancel_run(run.id).await;
            return Err(e);
        }
        Ok(run)
    }

    /// The values of every stored secret that decrypts, longest first; none without a key.
    async fn secret_values(&self) -> StoreResult<Vec<String>> {
        let Some(key) = self.secrets_key.get() else {
            return Ok(Vec::new());
        };
        let rows: Vec<(String, String, Vec<u8>, Vec<u8>)> = dispatch!(self, pool => {
            sqlx::query_as("SELECT name, pipeline, nonce, ciphertext FROM secrets")
                .fetch_all(pool)
                .await?
        });
        let mut values: Vec<String> = rows
            .iter()
            .filter_map(|(name, pipeline, nonce, ciphertext)| {
                key.decrypt(name, pipeline, nonce, ciphertext).ok()
            })
            .filter(|v| v.len() >= MIN_MASKED_LEN)
            .collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        Ok(values)
    }

    async fn record_audit(
        &self,
        actor: &str,
        action: &str,
        object: &str,
        job_id: Option<Uuid>,
        detail: &InvokeDetail,
    ) -> StoreResult<()> {
        let mut w = self.writer().await?;
        with_writer!(w, db => {
            sqlx::query(
                "INSERT INTO audit_events (id, actor, action, object, detail, created_at, job_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(Uuid::now_v7())
            .bind(actor)
            .bind(action)
            .bind(object)
            .bind(Json(detail))
            .bind(Utc::now())
            .bind(job_id)
            .execute(db)
            .await?;
        });
        Ok(())
    }

    /// Audit records newest first, optionally of one kind; `cursor` is the last id of the
    /// previous page.
    pub async fn list_audit(
        &self,
        kind: Option<&str>,
        limit: u32,
        cursor: Option<Uuid>,
    ) -> StoreResult<AuditList> {
        let limit = limit.clamp(1, 200);
        let before = cursor.unwrap_or(Uuid::max());
        let rows: Vec<AuditRow> = dispatch!(self, pool => {
            sqlx::query_as(
                "SELECT a.id, a.actor, a.action, a.detail, a.created_at, a.job_id, \
                 j.runner_id, r.name AS runner_name, j.status, j.exit_code \
                 FROM audit_events a \
                 LEFT JOIN jobs j ON j.id = a.job_id \
                 LEFT JOIN runners r ON r.id = j.runner_id \
                 WHERE ($1 IS NULL OR a.action = $1) AND a.id < $2 \
                 ORDER BY a.id DESC LIMIT $3",
            )
            .bind(kind)
            .bind(before)
            .bind(i64::from(limit) + 1)
            .fetch_all(pool)
            .await?
        });
        let more = rows.len() > limit as usize;
        let events = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| {
                let status = match r.status {
                    Some(s) => Some(
                        JobStatus::parse(&s)
                            .ok_or_else(|| StoreError::Corrupt(format!("job status {s}")))?,
                    ),
                    None => None,
                };
                let d = r.detail.0;
                Ok(AuditEvent {
                    id: r.id,
                    kind: r.action,
                    actor: r.actor,
                    actor_id: d.actor_id,
                    created_at: r.created_at,
                    command: d.command,
                    run_id: d.run_id,
                    job_id: r.job_id,
                    cluster: d.cluster,
                    labels: d.labels,
                    files: d.files,
                    runner_id: r.runner_id,
                    runner_name: r.runner_name,
                    status,
                    exit_code: r.exit_code,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let next_cursor = if more {
            events.last().map(|e| e.id.to_string())
        } else {
            None
        };
        Ok(AuditList {
            events,
            next_cursor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_secret_values_are_masked_longest_first() {
        let values = vec!["hunter2-long".to_string(), "hunter2".to_string()];
        assert_eq!(
            mask_values("mysql -phunter2-long && echo hunter2", &values),
            "mysql -p*** && echo ***"
        );
        assert_eq!(mask_values("kubectl get pods", &values), "kubectl get pods");
    }
}
