//! What the fuzz targets share: how a target's input becomes a webhook delivery, and the pipeline
//! its events are matched against.
//!
//! The targets are in `fuzz_targets/`; `scripts/fuzz` runs each one for a bounded time.

#![forbid(unsafe_code)]

use std::sync::OnceLock;

use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use outpost_server::hooks::{self, Source};
use outpost_server::pipeline::{self, PipelineDef};

/// A pipeline with a trigger of every kind and every filter, so matching walks every glob path.
const TRIGGERS_YAML: &str = r#"
triggers:
  - github: { repo: acme/web, events: [push, pull_request], branches: [main, "release/*"], paths: ["src/**", "!src/**/*.md"] }
  - github: { repo: acme/web, tags: ["v*"] }
  - gitlab: { project: acme/web, events: [push, tag_push, merge_request], branches: ["**"] }
  - azure_devops: { repository: web, events: [git.push, git.pullrequest.created], branches: [main], tags: ["v[0-9]*"] }
  - generic: {}
jobs:
  deploy:
    runs_on: [fuzz]
    steps:
      - run: "true"
"#;

/// The pipeline every parsed event is matched against.
pub fn trigger_pipeline() -> &'static PipelineDef {
    static DEF: OnceLock<PipelineDef> = OnceLock::new();
    DEF.get_or_init(|| pipeline::parse(TRIGGERS_YAML).expect("the fuzz pipeline is valid"))
}

/// The event header values a target's first byte chooses from, per forge.
fn event_names(source: Source) -> &'static [&'static str] {
    match source {
        Source::Github => &[
            "push",
            "pull_request",
            "ping",
            "create",
            "delete",
            "release",
            "workflow_run",
        ],
        Source::Gitlab => &[
            "Push Hook",
            "Tag Push Hook",
            "Merge Request Hook",
            "System Hook",
            "Note Hook",
        ],
        Source::AzureDevops | Source::Generic => &[""],
    }
}

/// Feeds one input to `source`'s parser, as a verified delivery, and matches what it yields.
///
/// The first byte picks the event header (low bits) and, for GitHub, a form-encoded body (high
/// bit); the rest is the body.
pub fn deliver(source: Source, data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let mut headers = HeaderMap::new();
    let names = event_names(source);
    let name = names[usize::from(selector & 0x7f) % names.len()];
    let event_header = match source {
        Source::Github => Some("x-github-event"),
        Source::Gitlab => Some("x-gitlab-event"),
        Source::AzureDevops | Source::Generic => None,
    };
    if let Some(header) = event_header {
        headers.insert(header, HeaderValue::from_static(name));
    }
    let content_type = if selector & 0x80 != 0 {
        "application/x-www-form-urlencoded"
    } else {
        "application/json"
    };
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    let Ok(events) = hooks::parse_verified(source, &headers, body) else {
        return;
    };
    let def = trigger_pipeline();
    for event in &events {
        assert_eq!(event.source, source, "an event keeps its source");
        let _ = hooks::triggers::select(def, event);
    }
}
