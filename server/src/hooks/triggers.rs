//! Trigger rules: which pipelines an [`Event`] starts.
//!
//! The rules follow GitHub Actions' `on: push` filters, which most people already know:
//!
//! - `events` lists the events a trigger answers; left out, it answers pushes (branches and tags)
//!   only, never pull requests, so a pipeline that deploys `main` does not deploy every pull
//!   request into `main` by accident.
//! - `branches` and `tags` are globs (`*` stops at `/`, `**` does not; a leading `!` excludes; a
//!   pattern starting with `refs/` is matched against the full ref). With neither, every ref
//!   matches; with only one of them, refs of the other kind do not. Pull and merge requests are
//!   matched by the branch they would merge into.
//! - `paths` are globs matched against the files a push changed; the trigger fires when any file
//!   matches. When the payload does not list every changed file, the trigger fires and says so.

use globset::{Glob, GlobBuilder, GlobMatcher};

use super::{Event, RefTarget, Source};
use crate::pipeline::{PipelineDef, TriggerDef};

/// How many changed files a "none matched" reason shows.
const SHOWN_FILES: usize = 5;

/// What a pipeline's triggers make of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Start a run; the note says something worth knowing about why.
    Fire {
        /// E.g. that a `paths` filter could not be checked.
        note: Option<String>,
    },
    /// Do not, because of this.
    Skip(String),
}

/// The event names a trigger of `source` (its YAML key) may list, normalised.
pub fn known_events(source: &str) -> &'static [&'static str] {
    match source {
        "github" => &["push", "pull_request"],
        "gitlab" => &["push", "tag_push", "merge_request", "pull_request"],
        "azure_devops" => &[
            "git.push",
            "git.pullrequest.created",
            "git.pullrequest.updated",
            "push",
            "pull_request",
        ],
        _ => &[],
    }
}

/// An event name as written in YAML, in the form [`known_events`] uses: lower case, spaces as
/// `_`, without GitLab's ` Hook` suffix (`Tag Push Hook` is `tag_push`).
pub fn normalise_event(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase().replace([' ', '-'], "_");
    match lower.strip_suffix("_hook") {
        Some(stripped) => stripped.to_owned(),
        None => lower,
    }
}

/// Checks a list of globs as the trigger matcher will read them; the error names the bad one.
pub fn check_patterns(patterns: &[String]) -> Result<(), String> {
    Patterns::compile(patterns).map(|_| ())
}

/// How a pipeline's triggers answer `event`: `None` when it has no trigger for the event's
/// source and repository at all. The first trigger that fires wins, so a pipeline starts at most one run per
/// event.
pub fn select(def: &PipelineDef, event: &Event) -> Option<Selection> {
    let mut reasons = Vec::new();
    for trigger in &def.triggers {
        match evaluate(trigger, event) {
            None => {}
            Some(fire @ Selection::Fire { .. }) => return Some(fire),
            Some(Selection::Skip(reason)) => reasons.push(reason),
        }
    }
    if reasons.is_empty() {
        None
    } else {
        Some(Selection::Skip(reasons.join("; ")))
    }
}

/// One trigger against one event; `None` when the trigger is for another source or repository.
fn evaluate(trigger: &TriggerDef, event: &Event) -> Option<Selection> {
    let (repo_ok, events, branches, tags, paths) = match (trigger, event.source) {
        (TriggerDef::Generic {}, Source::Generic) => {
            return Some(Selection::Fire { note: None });
        }
        (
            TriggerDef::Github {
                repo,
                events,
                branches,
                tags,
                paths,
            },
            Source::Github,
        ) => (
            same_repo(repo, event.repo.as_deref()),
            events,
            branches,
            tags,
            paths,
        ),
        (
            TriggerDef::Gitlab {
                project,
                events,
                branches,
                tags,
                paths,
            },
            Source::Gitlab,
        ) => (
            same_repo(project, event.repo.as_deref()),
            events,
            branches,
            tags,
            paths,
        ),
        (
            TriggerDef::AzureDevops {
                repository,
                events,
                branches,
                tags,
                paths,
            },
            Source::AzureDevops,
        ) => {
            // `repository: web` names the repository; `repository: Project/web` pins the project.
            let ok = if repository.contains('/') {
                same_repo(repository, event.repo.as_deref())
            } else {
                same_repo(repository, event.repo_name.as_deref())
            };
            (ok, events, branches, tags, paths)
        }
        _ => return None,
    };
    // A trigger for another repository is not about this event at all; listing it as skipped
    // would also show the sender other pipelines' names and repositories.
    if !repo_ok {
        return None;
    }
    if let Err(reason) = event_filter(events, event) {
        return Some(Selection::Skip(reason));
    }
    if let Err(reason) = ref_filter(branches, tags, event) {
        return Some(Selection::Skip(reason));
    }
    Some(paths_filter(paths, event))
}

fn same_repo(expected: &str, actual: Option<&str>) -> bool {
    let clean = |s: &str| {
        s.trim()
            .trim_matches('/')
            .trim_end_matches(".git")
            .to_ascii_lowercase()
    };
    actual.is_some_and(|a| clean(a) == clean(expected))
}

fn event_filter(events: &[String], event: &Event) -> Result<(), String> {
    if events.is_empty() {
        if event.pull_request {
            return Err(format!(
                "its trigger lists no `events`, which means pushes only; add `events: [push, {}]` \
                 to build {} too",
                event.names[0], event.name
            ));
        }
        return Ok(());
    }
    if events
        .iter()
        .any(|e| event.names.contains(&normalise_event(e).as_str()))
    {
        Ok(())
    } else {
        Err(format!(
            "its trigger listens to [{}], not `{}`",
            events.join(", "),
            event.name
        ))
    }
}

fn ref_filter(branches: &[String], tags: &[String], event: &Event) -> Result<(), String> {
    if branches.is_empty() && tags.is_empty() {
        return Ok(());
    }
    let (kind, short, full, patterns, other_kind) = match &event.target {
        RefTarget::Branch(b) => ("branch", b, format!("refs/heads/{b}"), branches, "tags"),
        RefTarget::Tag(t) => ("tag", t, format!("refs/tags/{t}"), tags, "branches"),
        RefTarget::Other => {
            return Err(format!(
                "its trigger filters by branch or tag, and {} is neither",
                event.describe_ref()
            ));
        }
    };
    if patterns.is_empty() {
        return Err(format!(
            "its trigger lists only {other_kind}, and this is {}",
            event.describe_ref()
        ));
    }
    let compiled = Patterns::compile(patterns).map_err(|e| format!("its trigger has {e}"))?;
    if compiled.matches(short, &full) {
        Ok(())
    } else {
        Err(format!(
            "{kind} `{short}` matches none of [{}]",
            patterns.join(", ")
        ))
    }
}

fn paths_filter(paths: &[String], event: &Event) -> Selection {
    if paths.is_empty() {
        return Selection::Fire { note: None };
    }
    let compiled = match Patterns::compile(paths) {
        Ok(c) => c,
        Err(e) => return Selection::Skip(format!("its trigger has {e}")),
    };
    let Some(files) = &event.changed_paths else {
        return Selection::Fire {
            note: Some(format!(
                "the `paths` filter was not checked because {}; the trigger fired anyway",
                event
                    .paths_unknown
                    .as_deref()
                    .unwrap_or("the payload does not list the changed files")
            )),
        };
    };
    if files.iter().any(|f| compiled.matches(f, f)) {
        return Selection::Fire { note: None };
    }
    let mut shown: Vec<&str> = files.iter().take(SHOWN_FILES).map(String::as_str).collect();
    if files.len() > SHOWN_FILES {
        shown.push("…");
    }
    Selection::Skip(format!(
        "none of the {} changed file(s) ({}) matches `paths` [{}]",
        files.len(),
        shown.join(", "),
        paths.join(", ")
    ))
}

/// Compiled globs with GitHub Actions semantics: the last pattern that matches decides, a `!`
/// pattern excludes, and a list of only exclusions starts from "everything".
struct Patterns {
    items: Vec<Pattern>,
}

struct Pattern {
    negated: bool,
    full_ref: bool,
    matcher: GlobMatcher,
}

impl Patterns {
    fn compile(patterns: &[String]) -> Result<Self, String> {
        let mut items = Vec::with_capacity(patterns.len());
        for raw in patterns {
            let (negated, glob) = match raw.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, raw.as_str()),
            };
            let expanded = expand_double_star(glob);
            let matcher = glob_builder(&expanded)
                .build()
                .map(|g: Glob| g.compile_matcher())
                .map_err(|e| format!("an invalid pattern `{raw}`: {}", e.kind()))?;
            items.push(Pattern {
                negated,
                full_ref: glob.starts_with("refs/"),
                matcher,
            });
        }
        Ok(Self { items })
    }

    /// Whether `short` (a branch, tag or path) is selected; `full` is the full ref, matched by
    /// patterns that start with `refs/`.
    fn matches(&self, short: &str, full: &str) -> bool {
        let mut selected = self.items.iter().all(|p| p.negated);
        for p in &self.items {
            let subject = if p.full_ref { full } else { short };
            if p.matcher.is_match(subject) {
                selected = !p.negated;
            }
        }
        selected
    }
}

fn glob_builder(glob: &str) -> GlobBuilder<'_> {
    let mut builder = GlobBuilder::new(glob);
    builder.literal_separator(true).backslash_escape(true);
    builder
}

/// Rewrites a `**` that starts a path component but does not end it (`**.js`,
/// `releases/**-alpha`) as `**/*…`, so that it matches across `/` as in GitHub Actions;
/// globset reads such a `**` as a plain `*`.
fn expand_double_star(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len() + 4);
    let mut rest = glob;
    let mut at_component_start = true;
    while let Some(i) = rest.find("**") {
        let before = &rest[..i];
        let starts_component = if before.is_empty() {
            at_component_start
        } else {
            before.ends_with('/')
        };
        let after = &rest[i + 2..];
        out.push_str(before);
        if starts_component && !after.is_empty() && !after.starts_with(['/', '*']) {
            out.push_str("**/*");
        } else {
            out.push_str("**");
        }
        at_component_start = false;
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(list: &[&str]) -> Patterns {
        Patterns::compile(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn globs_follow_github_actions() {
        let p = patterns(&["main", "release/*"]);
        assert!(p.matches("main", "refs/heads/main"));
        assert!(p.matches("release/1.2", "refs/heads/release/1.2"));
        assert!(!p.matches("release/1.2/hotfix", "refs/heads/release/1.2/hotfix"));
        assert!(!p.matches("mainline", "refs/heads/mainline"));

        let p = patterns(&["release/**", "!release/**-alpha"]);
        assert!(p.matches("release/1/2", ""));
        assert!(!p.matches("release/1-alpha", ""));

        let p = patterns(&["!docs/**"]);
        assert!(p.matches("src/main.rs", ""));
        assert!(!p.matches("docs/index.md", ""));

        let p = patterns(&["refs/heads/main"]);
        assert!(p.matches("main", "refs/heads/main"));
        assert!(!p.matches("main", "refs/tags/main"));

        let p = patterns(&["**.md"]);
        assert!(p.matches("README.md", ""));
        assert!(p.matches("docs/a/b.md", ""));
        let p = patterns(&["releases/**-alpha"]);
        assert!(p.matches("releases/10-alpha", ""));
        assert!(p.matches("releases/beta/3-alpha", ""));
        assert!(!p.matches("releases/10-beta", ""));
        assert_eq!(expand_double_star("docs/**"), "docs/**");
        assert_eq!(expand_double_star("**/x"), "**/x");
        let p = patterns(&["*.md"]);
        assert!(p.matches("README.md", ""));
        assert!(!p.matches("docs/b.md", ""));
    }

    #[test]
    fn invalid_globs_are_named() {
        let err = check_patterns(&["release/[".to_string()]).unwrap_err();
        assert!(err.contains("release/["), "{err}");
    }

    #[test]
    fn event_names_are_normalised() {
        assert_eq!(normalise_event("Push Hook"), "push");
        assert_eq!(normalise_event("Tag Push Hook"), "tag_push");
        assert_eq!(normalise_event("Merge Request Hook"), "merge_request");
        assert_eq!(normalise_event(" git.push "), "git.push");
        assert_eq!(normalise_event("pull-request"), "pull_request");
    }
}
