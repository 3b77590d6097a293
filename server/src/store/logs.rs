//! The job log: appended byte ranges, the same for both backends so any replica serves any log.

use chrono::Utc;
use uuid::Uuid;

use super::{Store, StoreError, StoreResult, dispatch, hash_token, with_writer};

/// One stored range of a job's log.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LogChunk {
    /// Offset of the first byte.
    pub start_offset: i64,
    /// The bytes.
    pub data: Vec<u8>,
}

impl Store {
    /// Appends `data` at `offset` for the lease holder; returns where the log now ends.
    ///
    /// Idempotent: bytes already stored are acknowledged without being stored again, and the
    /// part of a batch beyond the stored end is kept. A batch starting beyond the end is a gap.
    pub async fn append_log(
        &self,
        job_id: Uuid,
        lease_token: &str,
        offset: u64,
        data: &[u8],
    ) -> StoreResult<u64> {
        let now = Utc::now();
        if let super::Db::Postgres(pool) = &self.db
            && !data.is_empty()
        {
            // The common case, a batch that starts exactly where the stored log ends, is one
            // statement: the fenced size update, the chunk insert and the notification to other
            // replicas. Anything else (a resend, a gap, a lost lease) takes the general path.
            let end = offset + data.len() as u64;
            let stored: Option<(i64,)> = sqlx::query_as(
                "WITH j AS ( \
                   UPDATE jobs SET log_size = $5, heartbeat_seen = TRUE \
                   WHERE id = $1 AND status = 'running' AND lease_token_hash = $2 AND lease_expires_at > $3 \
                     AND log_size = $4 \
                   RETURNING id) \
                 INSERT INTO log_chunks (job_id, start_offset, end_offset, data) \
                 SELECT j.id, $4, $5, $6 FROM j, (SELECT pg_notify($7, $8)) AS n \
                 RETURNING end_offset",
            )
            .bind(job_id)
            .bind(hash_token(lease_token))
            .bind(now)
            .bind(offset as i64)
            .bind(end as i64)
            .bind(data)
            .bind(crate::events::CHANNEL)
            .bind(format!("log:{job_id}"))
            .fetch_optional(pool)
            .await?;
            if stored.is_some() {
                self.events.wake_log_local(job_id);
                return Ok(end);
            }
        }
        let mut w = self.writer().await?;
        if data.is_empty() {
            // An empty append only confirms the lease and asks where the log ends: one statement,
            // no transaction.
            let held: Option<(i64,)> = with_writer!(w, db => {
                sqlx::query_as(
                    "UPDATE jobs SET heartbeat_seen = TRUE \
                     WHERE id = $1 AND status = 'running' AND lease_token_hash = $2 AND lease_expires_at > $3 \
                     RETURNING log_size",
                )
                .bind(job_id)
                .bind(hash_token(lease_token))
                .bind(now)
                .fetch_optional(db)
                .await?
            });
            drop(w);
            return match held {
                None => Err(self.lease_failure_for_log(job_id).await),
                Some((size,)) if offset > size.max(0) as u64 => Err(StoreError::Gap {
                    next_offset: size.max(0) as u64,
                }),
                // Nothing a viewer sees changed: no wake-up, no notification to other replicas.
                Some((size,)) => Ok(size.max(0) as u64),
            };
        }
        // The fenced UPDATE also locks the job row (PostgreSQL) for the rest of the transaction,
        // so appends to one job are serialised even across replicas.
        let result: Result<Option<u64>, StoreError> = with_writer!(w, db => {
            let mut tx = db.begin_with(self.begin_write()).await?;
            let held: Option<(i64,)> = sqlx::query_as(
                "UPDATE jobs SET heartbeat_seen = TRUE \
                 WHERE id = $1 AND status = 'running' AND lease_token_hash = $2 AND lease_expires_at > $3 \
                 RETURNING log_size",
            )
            .bind(job_id)
            .bind(hash_token(lease_token))
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            match held {
                None => Ok(None),
                Some((size,)) => {
                    let size = size.max(0) as u64;
                    let end = offset + data.len() as u64;
                    if offset > size {
                        Err(StoreError::Gap { next_offset: size })
                    } else if end <= size {
                        tx.commit().await?;
                        Ok(Some(size))
                    } else {
                        let fresh = &data[(size - offset) as usize..];
                        sqlx::query(
                            "INSERT INTO log_chunks (job_id, start_offset, end_offset, data) VALUES ($1, $2, $3, $4)",
                        )
                        .bind(job_id)
                        .bind(size as i64)
                        .bind(end as i64)
                        .bind(fresh)
                        .execute(&mut *tx)
                        .await?;
                        sqlx::query("UPDATE jobs SET log_size = $2 WHERE id = $1")
                            .bind(job_id)
                            .bind(end as i64)
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await?;
                        Ok(Some(end))
                    }
                }
            }
        });
        drop(w);
        match result? {
            Some(next) => {
                if next > offset {
                    self.events.publish_log(job_id).await;
                }
                Ok(next)
            }
            None => Err(self.lease_failure_for_log(job_id).await),
        }
    }

    async fn lease_failure_for_log(&self, job_id: Uuid) -> StoreError {
        match self.job_log_state(job_id).await {
            Ok(_) => StoreError::LeaseLost,
            Err(e) => e,
        }
    }

    /// Up to `max_chunks` stored ranges that end after `from`, in order.
    pub async fn read_log(
        &self,
        job_id: Uuid,
        from: u64,
        max_chunks: u32,
    ) -> StoreResult<Vec<LogChunk>> {
        let rows: Vec<LogChunk> = dispatch!(self, pool => {
            sqlx::query_as(
                "SELECT start_offset, data FROM log_chunks WHERE job_id = $1 AND end_offset > $2 \
                 ORDER BY start_offset LIMIT $3",
            )
            .bind(job_id)
            .bind(from as i64)
            .bind(i64::from(max_chunks))
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }
}
