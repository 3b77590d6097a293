//! Pipelines: the YAML source and its parsed definition.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use outpost_protocol::Pipeline;
use sqlx::types::Json;
use uuid::Uuid;

use super::{Store, StoreError, StoreResult, dispatch, with_writer};
use crate::pipeline::PipelineDef;

#[derive(sqlx::FromRow)]
struct PipelineRow {
    name: String,
    description: Option<String>,
    yaml: String,
    definition: Json<PipelineDef>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl PipelineRow {
    fn into_api(self) -> (Pipeline, PipelineDef) {
        let def = self.definition.0;
        (
            Pipeline {
                name: self.name,
                description: self.description,
                yaml: self.yaml,
                jobs: def.jobs.iter().map(|j| j.name.clone()).collect(),
                created_at: self.created_at,
                updated_at: self.updated_at,
            },
            def,
        )
    }
}

/// Parsed definitions of the pipelines this replica created runs of, by name, each with the
/// revision it was read at. A run is created from a copy only if the pipeline is still at that
/// revision (the statement that takes the run's number checks it), so a copy never goes stale
/// unnoticed, whichever replica or process applied the pipeline since.
#[derive(Debug, Default)]
pub(crate) struct PipelineCache {
    entries: Mutex<HashMap<String, (Uuid, Arc<PipelineDef>)>>,
}

impl PipelineCache {
    fn get(&self, name: &str) -> Option<(Uuid, Arc<PipelineDef>)> {
        let map = self.entries.lock().expect("pipeline cache poisoned");
        map.get(name).cloned()
    }

    fn insert(&self, name: &str, revision: Uuid, def: Arc<PipelineDef>) {
        let mut map = self.entries.lock().expect("pipeline cache poisoned");
        // Pipelines are few; a map grown past this holds mostly deleted ones.
        if map.len() >= 4096 {
            map.clear();
        }
        map.insert(name.to_string(), (revision, def));
    }

    pub(crate) fn forget(&self, name: &str) {
        self.entries
            .lock()
            .expect("pipeline cache poisoned")
            .remove(name);
    }
}

const SELECT: &str =
    "SELECT name, description, yaml, definition, created_at, updated_at FROM pipelines";

impl Store {
    /// Creates or replaces a pipeline; returns it and whether it was new.
    pub async fn put_pipeline(
        &self,
        name: &str,
        yaml: &str,
        def: &PipelineDef,
    ) -> StoreResult<(Pipeline, bool)> {
        let now = Utc::now();
        let mut w = self.writer().await?;
        let (row, created): (PipelineRow, bool) = with_writer!(w, db => {
            let mut tx = db.begin_with(self.begin_write()).await?;
            let existed: Option<(String,)> = sqlx::query_as("SELECT name FROM pipelines WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            // Run numbers continue after the highest run ever stored under this name,
            // so a pipeline deleted and applied again never reuses a number.
            let row: PipelineRow = sqlx::query_as(
                "INSERT INTO pipelines (name, description, yaml, definition, next_run_number, created_at, updated_at, revision) \
                 VALUES ($1, $2, $3, $4, (SELECT COALESCE(MAX(number), 0) + 1 FROM runs WHERE pipeline = $1), $5, $5, $6) \
                 ON CONFLICT (name) DO UPDATE SET description = excluded.description, yaml = excluded.yaml, \
                 definition = excluded.definition, updated_at = excluded.updated_at, revision = excluded.revision \
                 RETURNING name, description, yaml, definition, created_at, updated_at",
            )
            .bind(name)
            .bind(def.description.clone())
            .bind(yaml)
            .bind(Json(def))
            .bind(now)
            .bind(Uuid::now_v7())
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            (row, existed.is_none())
        });
        self.pipeline_cache.forget(name);
        Ok((row.into_api().0, created))
    }

    /// A pipeline and its parsed definition.
    pub async fn get_pipeline(&self, name: &str) -> StoreResult<(Pipeline, PipelineDef)> {
        let row: Option<PipelineRow> = dispatch!(self, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT} WHERE name = $1")))
                .bind(name)
                .fetch_optional(pool)
                .await?
        });
        row.map(PipelineRow::into_api)
            .ok_or_else(|| StoreError::NotFound(format!("pipeline {name}")))
    }

    /// All pipelines by name.
    pub async fn list_pipelines(&self) -> StoreResult<Vec<Pipeline>> {
        let rows: Vec<PipelineRow> = dispatch!(self, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT} ORDER BY name")))
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(|r| r.into_api().0).collect())
    }

    /// Deletes a pipeline; its runs stay as history.
    pub async fn delete_pipeline(&self, name: &str) -> StoreResult<()> {
        let mut w = self.writer().await?;
        let n = with_writer!(w, db => {
            sqlx::query("DELETE FROM pipelines WHERE name = $1")
                .bind(name)
                .execute(db)
                .await?
                .rows_affected()
        });
        self.pipeline_cache.forget(name);
        if n == 0 {
            return Err(StoreError::NotFound(format!("pipeline {name}")));
        }
        Ok(())
    }

    /// A pipeline's definition and its revision, to create a run from: this replica's copy, or
    /// with `reread` (or without a copy) the stored one, which is then kept.
    pub(crate) async fn pipeline_for_run(
        &self,
        name: &str,
        reread: bool,
    ) -> StoreResult<(Uuid, Arc<PipelineDef>)> {
        if !reread && let Some(hit) = self.pipeline_cache.get(name) {
            return Ok(hit);
        }
        let row: Option<(Uuid, Json<PipelineDef>)> = dispatch!(self, pool => {
            sqlx::query_as("SELECT revision, definition FROM pipelines WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?
        });
        let (revision, def) =
            row.ok_or_else(|| StoreError::NotFound(format!("pipeline {name}")))?;
        let def = Arc::new(def.0);
        self.pipeline_cache.insert(name, revision, def.clone());
        Ok((revision, def))
    }
}
