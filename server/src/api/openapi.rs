//! The OpenAPI 3.1 document of every public route, generated from the handlers' annotations
//! and the wire types, and served at `GET /api/v1/openapi.json` without authentication.

use std::sync::OnceLock;

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use outpost_protocol as p;

/// The document's source: the annotated handlers and the schemas they mention.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Outpost",
        description = "Self-hosted CI/CD for private Kubernetes clusters: the public API, the runner protocol and the webhooks.",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(
        super::healthz,
        super::readyz,
        serve,
        super::pipelines::list,
        super::pipelines::apply,
        super::pipelines::get,
        super::pipelines::delete,
        super::runs::trigger,
        super::runs::list,
        super::runs::get,
        super::runs::cancel,
        super::runs::get_job,
        super::runs::cancel_job,
        super::logs::get_log,
        super::logs::stream_log,
        super::invoke::invoke,
        super::invoke::list_audit,
        super::hooks::list_deliveries,
        super::secrets::list,
        super::secrets::put,
        super::secrets::delete,
        super::runner::list,
        super::runner::register,
        super::runner::me,
        super::runner::registration_info,
        super::runner::acquire,
        super::runner::heartbeat,
        super::runner::append_log,
        super::runner::update_step,
        super::runner::complete,
        super::hooks::github,
        super::hooks::gitlab,
        super::hooks::azure_devops,
        super::hooks::generic,
    ),
    components(schemas(
        p::ErrorBody,
        p::ErrorDetail,
        p::JobStatus,
        p::RunStatus,
        p::StepStatus,
        p::When,
        p::StepAction,
        p::StepSpec,
        p::TriggerKind,
        p::TriggerInfo,
        p::RegisterRequest,
        p::RegisterResponse,
        p::RunnerIdentity,
        p::RegistrationInfo,
        p::EntraRegistrationInfo,
        p::AcquireRequest,
        p::Lease,
        p::AssignedJob,
        p::AcquireResponse,
        p::HeartbeatResponse,
        p::LogAppendResponse,
        p::StepUpdate,
        p::CompleteRequest,
        p::Pipeline,
        p::PipelineList,
        p::TriggerRunRequest,
        p::Run,
        p::RunList,
        p::Job,
        p::Step,
        p::RunnerState,
        p::Runner,
        p::RunnerList,
        p::UploadedFile,
        p::InvokeRequest,
        p::AuditEvent,
        p::AuditList,
        super::logs::LogSpans,
        crate::ansi::Span,
    )),
    modifiers(&BearerSchemes),
    tags(
        (name = "health", description = "Liveness, readiness and this document; no authentication"),
        (name = "pipelines", description = "Pipelines, applied from YAML"),
        (name = "runs", description = "Runs, jobs and their logs"),
        (name = "admin", description = "Secrets and webhook deliveries (admin scope)"),
        (name = "runners", description = "The runner protocol: registration, acquire and the lease-fenced per-job calls"),
        (name = "webhooks", description = "Forge webhooks; the signature is the credential"),
    )
)]
pub struct ApiDoc;

/// The three bearer credentials: API tokens, registration/runner tokens and lease tokens.
struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            (
                "api_token",
                "An API token (`read`, `trigger`, `invoke` or `admin`), or the web UI's session cookie",
            ),
            (
                "registration_token",
                "A registration token, or an Entra ID token where the server accepts them",
            ),
            ("runner_token", "The runner token given at registration"),
            (
                "lease_token",
                "The lease token of this job's current claim; a stale lease answers 409",
            ),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

/// The document, built once.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(ApiDoc::openapi)
}

/// `GET /api/v1/openapi.json`: this document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "health", operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of this server", content_type = "application/json")))]
pub async fn serve() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The document and the router are built from different sources (annotations and the route
    /// table); they must name the same routes.
    #[test]
    fn document_names_exactly_the_routers_routes() {
        let router: BTreeSet<(String, String)> = crate::api::route_table()
            .iter()
            .map(|r| (r.method.as_str().to_lowercase(), r.path.to_string()))
            .collect();
        let doc = serde_json::to_value(document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "put", "post", "delete", "patch", "head", "options"]
                    .contains(&method.as_str())
                {
                    documented.insert((method.clone(), path.clone()));
                }
            }
        }
        assert_eq!(documented, router);
    }
}
