//! Pipelines: the YAML source and its parsed definition.

use chrono::{DateTime, Utc};
use outpost_protocol::Pipeline;
use sqlx::types::Json;

use super::{Store, StoreError, StoreResult, dispatch};
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
        let _w = self.write_guard().await;
        let (row, created): (PipelineRow, bool) = dispatch!(self, pool => {
            let mut tx = pool.begin_with(self.begin_write()).await?;
            let existed: Option<(String,)> = sqlx::query_as("SELECT name FROM pipelines WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            // Run numbers continue after the highest run ever stored under this name,
            // so a pipeline deleted and applied again never reuses a number.
            let row: PipelineRow = sqlx::query_as(
                "INSERT INTO pipelines (name, description, yaml, definition, next_run_number, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, (SELECT COALESCE(MAX(number), 0) + 1 FROM runs WHERE pipeline = $1), $5, $5) \
                 ON CONFLICT (name) DO UPDATE SET description = excluded.description, yaml = excluded.yaml, \
                 definition = excluded.definition, updated_at = excluded.updated_at \
                 RETURNING name, description, yaml, definition, created_at, updated_at",
            )
            .bind(name)
            .bind(def.description.clone())
            .bind(yaml)
            .bind(Json(def))
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            (row, existed.is_none())
        });
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
        let _w = self.write_guard().await;
        let n = dispatch!(self, pool => {
            sqlx::query("DELETE FROM pipelines WHERE name = $1")
                .bind(name)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if n == 0 {
            return Err(StoreError::NotFound(format!("pipeline {name}")));
        }
        Ok(())
    }
}
