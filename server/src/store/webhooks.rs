//! Webhook deliveries: the record of every request to `/hooks/*`, and the claim that makes a
//! redelivered event start nothing new.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use super::{Store, StoreResult, dispatch, with_writer};
use crate::pipeline::PipelineDef;

/// Outcomes after which a delivery with the same id is processed again rather than answered as a
/// redelivery: the server failed, or some or all of the runs could not be started (a secret was
/// missing, say). Runs that were started are remembered, so processing it again never starts
/// them twice.
const RETRYABLE: &str = "('error', 'partial', 'failed')";

/// How long a delivery may stay `processing` before a redelivery of it takes it over. Handling
/// runs to the end even when the sender hangs up, so a delivery stays `processing` longer only
/// when the server stopped in the middle (or could not write the outcome). Runs the interrupted
/// attempt started are found by their trigger's delivery id and are not started again.
pub const STALE_PROCESSING_SECS: i64 = 600;

/// One recorded delivery, as `GET /api/v1/webhook-deliveries` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct WebhookDelivery {
    /// The record's id (UUID v7, so newer records sort later).
    pub id: Uuid,
    /// `github`, `gitlab`, `azure_devops` or `generic`.
    pub source: String,
    /// The delivery id the sender gave, if any; shown even when the delivery was refused.
    pub delivery_id: Option<String>,
    /// The forge event, e.g. `push` or `Merge Request Hook`, when known.
    pub event: Option<String>,
    /// The pipeline a generic delivery was addressed to.
    pub pipeline: Option<String>,
    /// `triggered`, `partial`, `no_match`, `ignored`, `ping`, `redelivery`, `unauthorized`,
    /// `malformed`, `too_large`, `not_found`, `failed`, `error`, or `processing` while it is handled.
    pub outcome: String,
    /// The HTTP status the sender was answered with (0 while it is being handled).
    pub status_code: i32,
    /// Why, in a sentence.
    pub reason: Option<String>,
    /// The runs this delivery started.
    #[sqlx(json)]
    pub run_ids: Vec<Uuid>,
    /// When it arrived.
    pub received_at: DateTime<Utc>,
}

/// A page of deliveries, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookDeliveryList {
    /// The deliveries.
    pub deliveries: Vec<WebhookDelivery>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A delivery to record as it is, without a claim on its delivery id.
#[derive(Debug, Clone, Default)]
pub struct NewDelivery {
    /// The source.
    pub source: String,
    /// The delivery id the sender gave.
    pub delivery_id: Option<String>,
    /// The event, if known.
    pub event: Option<String>,
    /// The generic pipeline it was addressed to.
    pub pipeline: Option<String>,
    /// The outcome.
    pub outcome: String,
    /// The HTTP status answered.
    pub status_code: u16,
    /// Why.
    pub reason: Option<String>,
    /// Runs started.
    pub run_ids: Vec<Uuid>,
}

/// What claiming a verified delivery's id found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The id is new: this is the first delivery, recorded as `processing` under `id`.
    New {
        /// The record to finish.
        id: Uuid,
    },
    /// An earlier delivery with this id failed, was only partly handled, or was left
    /// `processing` for [`STALE_PROCESSING_SECS`] by an attempt that stopped; it is `processing`
    /// again under its old record `id`, which already started `run_ids`.
    Retry {
        /// The record to finish.
        id: Uuid,
        /// Runs the earlier attempts started.
        run_ids: Vec<Uuid>,
    },
    /// A delivery with this id was received before (or is being handled right now).
    Seen(WebhookDelivery),
}

const COLS: &str =
    "id, source, delivery_id, event, pipeline, outcome, status_code, reason, run_ids, received_at";

impl Store {
    /// Records a delivery that claims nothing: refused, oversized, malformed, answered as a
    /// redelivery, or without a delivery id. Returns the record's id.
    #[tracing::instrument(skip_all, fields(source = %new.source, outcome = %new.outcome), err(Debug))]
    pub async fn record_delivery(&self, new: NewDelivery) -> StoreResult<Uuid> {
        let id = Uuid::now_v7();
        let now = Utc::now();
        let mut w = self.writer().await?;
        with_writer!(w, db => {
            sqlx::query(
                "INSERT INTO webhook_deliveries (id, source, delivery_id, dedupe_key, event, pipeline, outcome, \
                 status_code, reason, run_ids, received_at, updated_at) \
                 VALUES ($1, $2, $3, NULL, $4, $5, $6, $7, $8, $9, $10, $10)",
            )
            .bind(id)
            .bind(&new.source)
            .bind(new.delivery_id.as_deref())
            .bind(new.event.as_deref())
            .bind(new.pipeline.as_deref())
            .bind(&new.outcome)
            .bind(i32::from(new.status_code))
            .bind(new.reason.as_deref())
            .bind(Json(&new.run_ids))
            .bind(now)
            .execute(db)
            .await?;
        });
        Ok(id)
    }

    /// Claims `dedupe_key` for a delivery whose signature was verified.
    ///
    /// The insert is the lock: of two identical deliveries arriving at once, exactly one inserts
    /// the row (or takes over a retryable or stale one) and goes on to start runs; the other
    /// finds it and is answered as a redelivery.
    #[tracing::instrument(skip_all, fields(source = %new.source, delivery = ?new.delivery_id), err(Debug))]
    pub async fn claim_delivery(&self, new: &NewDelivery, dedupe_key: &str) -> StoreResult<Claim> {
        let id = Uuid::now_v7();
        let now = Utc::now();
        let stale_before = now - chrono::Duration::seconds(STALE_PROCESSING_SECS);
        let mut w = self.writer().await?;
        let claimed: Option<(Uuid, Json<Vec<Uuid>>, DateTime<Utc>)> = with_writer!(w, db => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "INSERT INTO webhook_deliveries (id, source, delivery_id, dedupe_key, event, pipeline, outcome, \
                 status_code, reason, run_ids, received_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'processing', 0, NULL, $7, $8, $8) \
                 ON CONFLICT (source, dedupe_key) DO UPDATE SET outcome = 'processing', status_code = 0, \
                 updated_at = excluded.updated_at WHERE webhook_deliveries.outcome IN {RETRYABLE} \
                 OR (webhook_deliveries.outcome = 'processing' AND webhook_deliveries.updated_at < $9) \
                 RETURNING id, run_ids, received_at"
            )))
            .bind(id)
            .bind(&new.source)
            .bind(new.delivery_id.as_deref())
            .bind(dedupe_key)
            .bind(new.event.as_deref())
            .bind(new.pipeline.as_deref())
            .bind(Json(Vec::<Uuid>::new()))
            .bind(now)
            .bind(stale_before)
            .fetch_optional(db)
            .await?
        });
        drop(w);
        match claimed {
            Some((claimed_id, _, _)) if claimed_id == id => Ok(Claim::New { id }),
            Some((claimed_id, Json(mut run_ids), received_at)) => {
                // An attempt that stopped before it wrote its outcome started runs it never
                // recorded; their triggers name this delivery.
                for run in self.runs_of_delivery(new, received_at).await? {
                    if !run_ids.contains(&run) {
                        run_ids.push(run);
                    }
                }
                Ok(Claim::Retry {
                    id: claimed_id,
                    run_ids,
                })
            }
            None => {
                let seen: WebhookDelivery = dispatch!(self, pool => {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {COLS} FROM webhook_deliveries WHERE source = $1 AND dedupe_key = $2"
                    )))
                    .bind(&new.source)
                    .bind(dedupe_key)
                    .fetch_one(pool)
                    .await?
                });
                Ok(Claim::Seen(seen))
            }
        }
    }

    /// Runs whose trigger names this delivery (its source and delivery id, and for a generic
    /// delivery its pipeline), created since it was first received, oldest first.
    async fn runs_of_delivery(
        &self,
        new: &NewDelivery,
        received_at: DateTime<Utc>,
    ) -> StoreResult<Vec<Uuid>> {
        let Some(delivery_id) = new.delivery_id.as_deref() else {
            return Ok(Vec::new());
        };
        // Run ids are UUID v7: every run created since (a second of clock skew between replicas
        // allowed) sorts at or after this one, so the primary key bounds the scan.
        let millis = u64::try_from((received_at - chrono::Duration::seconds(1)).timestamp_millis())
            .unwrap_or(0);
        let since = uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10]).into_uuid();
        let sql = match &self.db {
            super::Db::Sqlite(_) => {
                "SELECT id FROM runs WHERE id >= $1 \
                 AND json_extract(trigger, '$.source') = $2 \
                 AND json_extract(trigger, '$.delivery_id') = $3 \
                 AND ($4 IS NULL OR pipeline = $4) ORDER BY id"
            }
            super::Db::Postgres(_) => {
                "SELECT id FROM runs WHERE id >= $1 \
                 AND trigger->>'source' = $2 AND trigger->>'delivery_id' = $3 \
                 AND ($4::text IS NULL OR pipeline = $4) ORDER BY id"
            }
        };
        let rows: Vec<(Uuid,)> = dispatch!(self, pool => {
            sqlx::query_as(sql)
                .bind(since)
                .bind(&new.source)
                .bind(delivery_id)
                .bind(new.pipeline.as_deref())
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Writes the final outcome of a claimed delivery.
    #[tracing::instrument(skip_all, fields(delivery.record = %id, outcome), err(Debug))]
    pub async fn finish_delivery(
        &self,
        id: Uuid,
        outcome: &str,
        status_code: u16,
        reason: Option<&str>,
        run_ids: &[Uuid],
    ) -> StoreResult<()> {
        let now = Utc::now();
        let mut w = self.writer().await?;
        with_writer!(w, db => {
            sqlx::query(
                "UPDATE webhook_deliveries SET outcome = $2, status_code = $3, reason = $4, run_ids = $5, \
                 updated_at = $6 WHERE id = $1",
            )
            .bind(id)
            .bind(outcome)
            .bind(i32::from(status_code))
            .bind(reason)
            .bind(Json(run_ids))
            .bind(now)
            .execute(db)
            .await?;
        });
        Ok(())
    }

    /// Deliveries newest first, optionally from one source; `cursor` is the last id of the
    /// previous page.
    pub async fn list_deliveries(
        &self,
        source: Option<&str>,
        limit: u32,
        cursor: Option<Uuid>,
    ) -> StoreResult<WebhookDeliveryList> {
        let limit = limit.clamp(1, 200);
        let before = cursor.unwrap_or(Uuid::max());
        let rows: Vec<WebhookDelivery> = dispatch!(self, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {COLS} FROM webhook_deliveries WHERE ($1 IS NULL OR source = $1) AND id < $2 \
                 ORDER BY id DESC LIMIT $3"
            )))
            .bind(source)
            .bind(before)
            .bind(i64::from(limit) + 1)
            .fetch_all(pool)
            .await?
        });
        let more = rows.len() > limit as usize;
        let deliveries: Vec<WebhookDelivery> = rows.into_iter().take(limit as usize).collect();
        let next_cursor = if more {
            deliveries.last().map(|d| d.id.to_string())
        } else {
            None
        };
        Ok(WebhookDeliveryList {
            deliveries,
            next_cursor,
        })
    }

    /// Every pipeline's name and definition, for matching a forge event against their triggers.
    pub async fn pipeline_definitions(&self) -> StoreResult<Vec<(String, PipelineDef)>> {
        let rows: Vec<(String, Json<PipelineDef>)> = dispatch!(self, pool => {
            sqlx::query_as("SELECT name, definition FROM pipelines ORDER BY name")
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(|(name, def)| (name, def.0)).collect())
    }
}
