//! Pipeline YAML: parsing, validation, and the order jobs may run in.
//!
//! A malformed pipeline is rejected when it is applied, so every problem is reported with the
//! line and column of the node at fault and a sentence saying what was expected.
//! The YAML is first read into a tree that keeps positions (see `yaml.rs`); the checks below walk
//! that tree by hand rather than through serde, because semantic problems such as an unknown
//! `needs` entry or a cycle need positions as much as type errors do.

mod yaml;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use outpost_protocol::{StepAction, StepSpec, When};
use serde::{Deserialize, Serialize};

use self::yaml::{Entry, Mark, Node, ScalarKind, Value};

/// The largest pipeline document accepted, in bytes.
pub const MAX_YAML_BYTES: usize = 1024 * 1024;

/// The job timeout when the YAML names none, in seconds.
pub const DEFAULT_JOB_TIMEOUT_SECS: u64 = 3600;

/// The longest timeout a job or step may ask for, in seconds (seven days).
///
/// Larger values are almost certainly typos, and a bound keeps later arithmetic on deadlines far
/// from overflow.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// How many characters of a command a derived step name keeps.
const STEP_NAME_CHARS: usize = 60;

const TOP_KEYS: &[&str] = &[
    "description",
    "repository",
    "triggers",
    "variables",
    "secrets",
    "jobs",
];
const JOB_KEYS: &[&str] = &[
    "runs_on",
    "cluster",
    "environment",
    "timeout",
    "needs",
    "steps",
];
const STEP_KEYS: &[&str] = &[
    "name", "when", "timeout", "run", "shell", "kubectl", "helm", "checkout",
];
const ACTION_KEYS: &[&str] = &["run", "kubectl", "helm", "checkout"];
const CHECKOUT_KEYS: &[&str] = &["path", "depth", "token"];
const TRIGGER_SOURCES: &[&str] = &["github", "gitlab", "azure_devops", "generic"];
const GITHUB_KEYS: &[&str] = &["repo", "events", "branches", "tags", "paths"];
const GITLAB_KEYS: &[&str] = &["project", "events", "branches", "tags", "paths"];
const AZURE_DEVOPS_KEYS: &[&str] = &["repository", "events", "branches", "tags", "paths"];
const WHEN_VALUES: &[&str] = &["on_success", "on_failure", "always"];

/// A parsed, validated pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineDef {
    /// What the pipeline is for, shown in the UI.
    pub description: Option<String>,
    /// The clone URL `checkout` uses when the trigger names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Webhook sources that start a run.
    pub triggers: Vec<TriggerDef>,
    /// Variables every step sees; YAML scalars (strings, numbers, booleans) become their text.
    pub variables: BTreeMap<String, String>,
    /// Names of secrets from the server's secret store that every step sees.
    pub secrets: Vec<String>,
    /// The jobs, in the order they appear in the YAML.
    pub jobs: Vec<JobDef>,
}

/// One job of a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDef {
    /// The job's name, unique within the pipeline.
    pub name: String,
    /// Labels a runner must all carry to take the job; may be empty.
    pub runs_on: Vec<String>,
    /// The cluster the runner prepares `KUBECONFIG` for, if any.
    pub cluster: Option<String>,
    /// The deployment environment; at most one job per environment runs at a time.
    pub environment: Option<String>,
    /// The job's timeout in seconds.
    pub timeout_secs: u64,
    /// Jobs that must succeed before this one starts, as written.
    pub needs: Vec<String>,
    /// The steps; a step's `index` is its position.
    pub steps: Vec<StepSpec>,
}

/// A webhook source that starts runs of the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum TriggerDef {
    /// Events from a GitHub repository.
    Github {
        /// `owner/name`.
        repo: String,
        /// Event names such as `push` or `pull_request`; empty means pushes (branches and tags).
        events: Vec<String>,
        /// Branch globs (`*` stops at `/`, `!` excludes); `hooks::triggers` says how they
        /// combine with `tags`.
        branches: Vec<String>,
        /// Tag globs; see `hooks::triggers` for how they combine with `branches`.
        tags: Vec<String>,
        /// Globs of which a push must change at least one file; empty matches every change.
        paths: Vec<String>,
    },
    /// Events from a GitLab project.
    Gitlab {
        /// The project's path, e.g. `group/project`.
        project: String,
        /// Event names such as `push` or `pull_request`; empty means pushes (branches and tags).
        events: Vec<String>,
        /// Branch globs (`*` stops at `/`, `!` excludes); `hooks::triggers` says how they
        /// combine with `tags`.
        branches: Vec<String>,
        /// Tag globs; see `hooks::triggers` for how they combine with `branches`.
        tags: Vec<String>,
        /// Globs of which a push must change at least one file; empty matches every change.
        paths: Vec<String>,
    },
    /// Service hook notifications from an Azure DevOps repository.
    AzureDevops {
        /// The repository's name.
        repository: String,
        /// Event types such as `git.push`; empty means pushes (branches and tags).
        events: Vec<String>,
        /// Branch globs (`*` stops at `/`, `!` excludes); `hooks::triggers` says how they
        /// combine with `tags`.
        branches: Vec<String>,
        /// Tag globs; see `hooks::triggers` for how they combine with `branches`.
        tags: Vec<String>,
        /// Globs of which a push must change at least one file; empty matches every change.
        paths: Vec<String>,
    },
    /// HMAC-signed posts to `/hooks/generic/<pipeline>`, under the key in the server's
    /// configuration (`webhooks.generic.<pipeline>.secret`), never in the pipeline.
    Generic {},
}

/// A problem with the YAML: where and what.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct PipelineError {
    /// 1-based line of the offending node.
    pub line: usize,
    /// 1-based column of the offending node, counted in characters.
    pub column: usize,
    /// What was wrong and what was expected.
    pub message: String,
}

impl PipelineDef {
    /// The job with this name, if there is one.
    pub fn job(&self, name: &str) -> Option<&JobDef> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// Jobs in an order where every job comes after all of its needs, otherwise in YAML order.
    ///
    /// [`parse`] guarantees there is no cycle; for a definition built by hand that has one, the
    /// jobs caught in it come last, in YAML order, so that no job is ever dropped.
    pub fn topological_order(&self) -> Vec<&JobDef> {
        let index: HashMap<&str, usize> = self
            .jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.name.as_str(), i))
            .collect();
        let mut waiting_on = vec![0usize; self.jobs.len()];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); self.jobs.len()];
        for (i, job) in self.jobs.iter().enumerate() {
            let needs: BTreeSet<usize> = job
                .needs
                .iter()
                .filter_map(|n| index.get(n.as_str()).copied())
                .filter(|&n| n != i)
                .collect();
            waiting_on[i] = needs.len();
            for n in needs {
                dependents[n].push(i);
            }
        }
        // Taking the earliest ready job each time keeps the order as close to the YAML as the
        // needs allow, which is what people expect to see in the UI.
        let mut ready: BTreeSet<usize> = (0..self.jobs.len())
            .filter(|&i| waiting_on[i] == 0)
            .collect();
        let mut placed = vec![false; self.jobs.len()];
        let mut order = Vec::with_capacity(self.jobs.len());
        while let Some(i) = ready.pop_first() {
            placed[i] = true;
            order.push(&self.jobs[i]);
            for &d in &dependents[i] {
                waiting_on[d] -= 1;
                if waiting_on[d] == 0 {
                    ready.insert(d);
                }
            }
        }
        order.extend(
            self.jobs
                .iter()
                .enumerate()
                .filter(|&(i, _)| !placed[i])
                .map(|(_, j)| j),
        );
        order
    }
}

/// Checks a pipeline name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if is_name(name, false) {
        Ok(())
    } else {
        Err(format!(
            "the pipeline name `{name}` is not valid: use 1 to 63 lowercase letters, digits and \
             `-`, starting with a letter or digit"
        ))
    }
}

/// Whether `name` matches `[a-z0-9][a-z0-9-]{0,62}`, or `[a-z0-9][a-z0-9_-]{0,62}` when
/// underscores are allowed.
fn is_name(name: &str, underscore: bool) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    name.len() <= 63
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && chars.all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (underscore && c == '_')
        })
}

/// Whether `name` is a valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses and validates a pipeline.
pub fn parse(yaml: &str) -> Result<PipelineDef, PipelineError> {
    if yaml.len() > MAX_YAML_BYTES {
        return Err(Mark::START.error(format!(
            "the pipeline is {} bytes, more than the {MAX_YAML_BYTES} bytes (1 MiB) allowed; \
             split it into smaller pipelines",
            yaml.len()
        )));
    }
    let Some(root) = yaml::load(yaml)? else {
        return Err(Mark::START
            .error("the pipeline is empty; it needs at least a `jobs:` mapping with one job"));
    };
    let top = match &root.value {
        Value::Map(entries) => entries,
        _ => {
            return Err(root.mark.error(format!(
                "a pipeline is a mapping with keys such as `jobs:`, but this document is {}",
                root.describe()
            )));
        }
    };
    check_keys(top, TOP_KEYS, "at the top level of the pipeline")?;

    let description = match get(top, "description") {
        Some(e) => optional_text(&e.value, "`description`")?,
        None => None,
    };

    let repository = match get(top, "repository") {
        Some(e) => parse_repository(&e.value)?,
        None => None,
    };

    let mut triggers = Vec::new();
    if let Some(e) = get(top, "triggers") {
        for item in list(&e.value, "`triggers`")? {
            triggers.push(parse_trigger(item)?);
        }
    }

    let mut variables = BTreeMap::new();
    if let Some(e) = get(top, "variables") {
        for var in map(&e.value, "`variables`")? {
            if !is_env_name(&var.key) {
                return Err(var.key_mark.error(format!(
                    "`{}` is not a valid variable name: use letters, digits and `_`, not starting \
                     with a digit",
                    var.key
                )));
            }
            let value = match &var.value.value {
                Value::Scalar(_, ScalarKind::Null) => {
                    return Err(var.key_mark.error(format!(
                        "variable `{}` has no value; write `{}: \"\"` if it should be empty",
                        var.key, var.key
                    )));
                }
                Value::Scalar(text, _) => text.clone(),
                _ => {
                    return Err(var.value.mark.error(format!(
                        "variable `{}` must be text, a number or true/false, but found {}",
                        var.key,
                        var.value.describe()
                    )));
                }
            };
            variables.insert(var.key.clone(), value);
        }
    }

    let mut secrets: Vec<String> = Vec::new();
    if let Some(e) = get(top, "secrets") {
        for (name, mark) in text_list(&e.value, "`secrets`")? {
            if !is_env_name(&name) {
                return Err(mark.error(format!(
                    "`{name}` is not a valid secret name: use letters, digits and `_`, not \
                     starting with a digit"
                )));
            }
            if secrets.contains(&name) {
                return Err(mark.error(format!("secret `{name}` is listed twice")));
            }
            if variables.contains_key(&name) {
                return Err(mark.error(format!(
                    "`{name}` is both a variable and a secret; give them different names"
                )));
            }
            secrets.push(name);
        }
    }

    let jobs_entry = get(top, "jobs").ok_or_else(|| {
        root.mark
            .error("the pipeline has no `jobs`; add a `jobs:` mapping with at least one job")
    })?;
    if jobs_entry.value.is_null() {
        return Err(jobs_entry
            .key_mark
            .error("`jobs` is empty; add at least one job under it"));
    }
    let job_entries = map(&jobs_entry.value, "`jobs`")?;
    if job_entries.is_empty() {
        return Err(jobs_entry
            .value
            .mark
            .error("`jobs` is empty; add at least one job under it"));
    }
    let mut jobs = Vec::with_capacity(job_entries.len());
    let mut need_marks = Vec::with_capacity(job_entries.len());
    for entry in job_entries {
        let (job, marks) = parse_job(entry, &secrets)?;
        jobs.push(job);
        need_marks.push(marks);
    }
    check_needs(&jobs, &need_marks)?;

    Ok(PipelineDef {
        description,
        repository,
        triggers,
        variables,
        secrets,
        jobs,
    })
}

/// `secrets` are the names the pipeline lists, which a `checkout` token must be one of.
fn parse_job(entry: &Entry, secrets: &[String]) -> Result<(JobDef, Vec<Mark>), PipelineError> {
    let name = &entry.key;
    if !is_name(name, true) {
        return Err(entry.key_mark.error(format!(
            "`{name}` is not a valid job name: use 1 to 63 lowercase letters, digits, `-` and \
             `_`, starting with a letter or digit"
        )));
    }
    if entry.value.is_null() {
        return Err(entry.key_mark.error(format!(
            "job `{name}` has no `steps`; give it a `steps:` list"
        )));
    }
    let fields = map(&entry.value, &format!("job `{name}`"))?;
    check_keys(fields, JOB_KEYS, &format!("in job `{name}`"))?;

    let runs_on = match get(fields, "runs_on") {
        Some(e) => text_list(&e.value, "`runs_on`")?
            .into_iter()
            .map(|(label, _)| label)
            .collect(),
        None => Vec::new(),
    };
    let cluster = match get(fields, "cluster") {
        Some(e) => {
            let cluster = optional_text(&e.value, "`cluster`")?;
            // The cluster becomes the required runner label `cluster:NAME`, so it must be a name
            // a runner can register with, or the job would wait for ever.
            if let Some(c) = &cluster
                && (c.len() > 63
                    || !c
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.')))
            {
                return Err(e.value.mark.error(format!(
                    "`{c}` is not a valid cluster name: use 1 to 63 letters, digits, `-`, `_` or `.`, as in the runner's `[clusters.NAME]`"
                )));
            }
            cluster
        }
        None => None,
    };
    let environment = match get(fields, "environment") {
        Some(e) => optional_text(&e.value, "`environment`")?,
        None => None,
    };
    let timeout_secs = match get(fields, "timeout") {
        Some(e) => duration(&e.value, "`timeout`")?,
        None => DEFAULT_JOB_TIMEOUT_SECS,
    };
    let (needs, need_marks): (Vec<String>, Vec<Mark>) = match get(fields, "needs") {
        Some(e) => text_list(&e.value, "`needs`")?.into_iter().unzip(),
        None => (Vec::new(), Vec::new()),
    };

    let steps_entry = get(fields, "steps").ok_or_else(|| {
        entry.key_mark.error(format!(
            "job `{name}` has no `steps`; give it a `steps:` list"
        ))
    })?;
    if steps_entry.value.is_null() {
        return Err(steps_entry.key_mark.error(format!(
            "the `steps` of job `{name}` are empty; list at least one step"
        )));
    }
    let step_nodes = list(&steps_entry.value, "`steps`")?;
    if step_nodes.is_empty() {
        return Err(steps_entry.value.mark.error(format!(
            "the `steps` of job `{name}` are empty; list at least one step"
        )));
    }
    let mut steps = Vec::with_capacity(step_nodes.len());
    for (i, node) in step_nodes.iter().enumerate() {
        let index = u32::try_from(i).map_err(|_| node.mark.error("too many steps in one job"))?;
        steps.push(parse_step(node, index, secrets)?);
    }

    Ok((
        JobDef {
            name: name.clone(),
            runs_on,
            cluster,
            environment,
            timeout_secs,
            needs,
            steps,
        },
        need_marks,
    ))
}

fn parse_step(node: &Node, index: u32, secrets: &[String]) -> Result<StepSpec, PipelineError> {
    let entries = match &node.value {
        Value::Map(entries) => entries,
        Value::Scalar(text, ScalarKind::Str) if text == "checkout" => {
            return Ok(StepSpec {
                index,
                name: "checkout".to_owned(),
                action: StepAction::Checkout {
                    path: None,
                    depth: None,
                    token_secret: None,
                },
                when: When::OnSuccess,
                timeout_secs: None,
            });
        }
        Value::Scalar(_, ScalarKind::Null) => {
            return Err(node.mark.error(
                "this step is empty; a step is `checkout` or a mapping with one of `run`, \
                 `kubectl`, `helm` or `checkout`",
            ));
        }
        Value::Scalar(text, _) => {
            return Err(node.mark.error(format!(
                "a step is `checkout` or a mapping with one of `run`, `kubectl`, `helm` or \
                 `checkout`, but found `{text}`; to run a command write `- run: {text}`"
            )));
        }
        Value::Seq(_) => {
            return Err(node.mark.error(
                "a step is `checkout` or a mapping with one of `run`, `kubectl`, `helm` or \
                 `checkout`, but found a list",
            ));
        }
    };
    check_keys(entries, STEP_KEYS, "in a step")?;

    let actions: Vec<&Entry> = entries
        .iter()
        .filter(|e| ACTION_KEYS.contains(&e.key.as_str()))
        .collect();
    let action_entry = match actions.as_slice() {
        [] => {
            return Err(node.mark.error(
                "this step does nothing: give it exactly one of `run`, `kubectl`, `helm` or \
                 `checkout`",
            ));
        }
        [one] => *one,
        [first, second, ..] => {
            return Err(second.key_mark.error(format!(
                "a step does exactly one thing, but this one has both `{}` and `{}`; split it \
                 into two steps",
                first.key, second.key
            )));
        }
    };

    let shell = get(entries, "shell");
    if let Some(shell) = shell
        && action_entry.key != "run"
    {
        return Err(shell.key_mark.error(format!(
            "`shell` only applies to `run` steps, but this is a `{}` step",
            action_entry.key
        )));
    }

    let value = &action_entry.value;
    let (action, default_name) = match action_entry.key.as_str() {
        "run" => {
            let script = text(value, "`run`")?;
            let Some(first_line) = script.lines().map(str::trim).find(|l| !l.is_empty()) else {
                return Err(value
                    .mark
                    .error("`run` is empty; give it the script to run"));
            };
            let shell = match shell {
                Some(e) => {
                    let line = text(&e.value, "`shell`")?;
                    if !line.contains("{0}") {
                        return Err(e.value.mark.error(format!(
                            "`shell` must contain `{{0}}` where the script file goes, e.g. \
                             `bash -eo pipefail {{0}}` or `python3 {{0}}`, but found `{line}`"
                        )));
                    }
                    Some(line.to_owned())
                }
                None => None,
            };
            let name = format!("run: {}", truncate(first_line, STEP_NAME_CHARS));
            (
                StepAction::Run {
                    script: script.to_owned(),
                    shell,
                },
                name,
            )
        }
        tool @ ("kubectl" | "helm") => {
            let (args, shown) = tool_args(value, tool)?;
            let name = format!("{tool} {}", truncate(&shown, STEP_NAME_CHARS));
            let action = if tool == "kubectl" {
                StepAction::Kubectl { args }
            } else {
                StepAction::Helm { args }
            };
            (action, name)
        }
        _ => (parse_checkout(value, secrets)?, "checkout".to_owned()),
    };

    let name = match get(entries, "name") {
        Some(e) => {
            let name = text(&e.value, "`name`")?.trim();
            if name.is_empty() {
                return Err(e
                    .value
                    .mark
                    .error("`name` is empty; remove it or give the step a name"));
            }
            name.to_owned()
        }
        None => default_name,
    };
    let when = match get(entries, "when") {
        Some(e) => match text(&e.value, "`when`")? {
            "on_success" => When::OnSuccess,
            "on_failure" => When::OnFailure,
            "always" => When::Always,
            other => {
                return Err(e.value.mark.error(format!(
                    "`when` must be one of {}, but found `{other}`",
                    quoted_list(WHEN_VALUES)
                )));
            }
        },
        None => When::OnSuccess,
    };
    let timeout_secs = match get(entries, "timeout") {
        Some(e) => Some(duration(&e.value, "`timeout`")?),
        None => None,
    };

    Ok(StepSpec {
        index,
        name,
        action,
        when,
        timeout_secs,
    })
}

/// Reads the arguments of a `kubectl:` or `helm:` step: a command line split shell-style, or a
/// list of words taken as they are. Also returns the command line to show in the step's name.
fn tool_args(value: &Node, tool: &str) -> Result<(Vec<String>, String), PipelineError> {
    let (args, shown) = match &value.value {
        Value::Seq(items) => {
            let mut args = Vec::with_capacity(items.len());
            for item in items {
                args.push(text(item, &format!("each `{tool}` argument"))?.to_owned());
            }
            let shown = shell_words::join(&args);
            (args, shown)
        }
        _ => {
            let line = text(value, &format!("`{tool}`"))?;
            let args = shell_words::split(line).map_err(|_| {
                value.mark.error(format!(
                    "the `{tool}` arguments have an unbalanced quote: every `'` or `\"` needs a \
                     closing partner"
                ))
            })?;
            let shown = line
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or_default()
                .to_owned();
            (args, shown)
        }
    };
    let Some(first) = args.first() else {
        return Err(value.mark.error(format!(
            "`{tool}` has no arguments; write what to run, e.g. `{}`",
            example_args(tool)
        )));
    };
    if first == tool {
        return Err(value.mark.error(format!(
            "do not repeat `{tool}`: the step already runs {tool}, so write `{tool}: {}` rather \
             than `{tool}: {tool} {}`",
            example_args(tool),
            example_args(tool)
        )));
    }
    if let Some(op) = args
        .iter()
        .find(|a| ["|", "||", "&&", ";", ">", ">>", "<"].contains(&a.as_str()))
    {
        return Err(value.mark.error(format!(
            "`{tool}` steps run {tool} directly, not through a shell, so `{op}` would reach \
             {tool} as an argument; use a `run:` step for pipes, redirections and `&&`"
        )));
    }
    Ok((args, shown))
}

fn example_args(tool: &str) -> &'static str {
    if tool == "kubectl" {
        "apply -f k8s/"
    } else {
        "upgrade --install web ./chart"
    }
}

fn parse_checkout(value: &Node, secrets: &[String]) -> Result<StepAction, PipelineError> {
    if value.is_null() {
        return Ok(StepAction::Checkout {
            path: None,
            depth: None,
            token_secret: None,
        });
    }
    let Value::Map(entries) = &value.value else {
        return Err(value.mark.error(format!(
            "`checkout` takes a mapping such as `checkout: {{path: sub/dir, depth: 1, token: \
             GIT_TOKEN}}` or `checkout: {{}}`, but found {}",
            value.describe()
        )));
    };
    check_keys(entries, CHECKOUT_KEYS, "in `checkout`")?;
    let path = match get(entries, "path") {
        Some(e) => {
            let path = text(&e.value, "`path`")?;
            let escapes = path.starts_with(['/', '\\'])
                || path.get(1..2) == Some(":")
                || path.split(['/', '\\']).any(|part| part == "..");
            if path.trim().is_empty() || escapes {
                return Err(e.value.mark.error(format!(
                    "`path` must be a directory inside the job's workspace, such as `src/app`, \
                     but found `{path}`"
                )));
            }
            Some(path.to_owned())
        }
        None => None,
    };
    let depth = match get(entries, "depth") {
        Some(e) => {
            let depth = match &e.value.value {
                Value::Scalar(text, ScalarKind::Int) => text.parse::<u32>().ok().filter(|&d| d > 0),
                _ => None,
            };
            let Some(depth) = depth else {
                return Err(e.value.mark.error(
                    "`depth` must be a whole number of commits, 1 or more (leave it out to clone \
                     what the commit needs)",
                ));
            };
            Some(depth)
        }
        None => None,
    };
    let token_secret = match get(entries, "token") {
        Some(e) => {
            let name = text(&e.value, "`token`")?.trim();
            if !is_env_name(name) {
                return Err(e.value.mark.error(format!(
                    "`token` names the secret that holds the repository's access token, such as \
                     `token: GIT_TOKEN`, but `{name}` is not a valid secret name"
                )));
            }
            if !secrets.iter().any(|s| s == name) {
                return Err(e.value.mark.error(format!(
                    "`token` names secret `{name}`, but the pipeline does not list it; add it to \
                     the top-level `secrets:` list, e.g. `secrets: [{name}]`"
                )));
            }
            Some(name.to_owned())
        }
        None => None,
    };
    Ok(StepAction::Checkout {
        path,
        depth,
        token_secret,
    })
}

/// The top-level `repository`: the URL `checkout` clones from when the trigger gives none.
///
/// Credentials in the URL are refused: they would be stored with the pipeline and shown to
/// everyone who can read it, while a `checkout` `token` stays in the secret store.
fn parse_repository(node: &Node) -> Result<Option<String>, PipelineError> {
    let Some(url) = optional_text(node, "`repository`")? else {
        return Ok(None);
    };
    if url.contains(char::is_whitespace) {
        return Err(node.mark.error(format!(
            "`repository` must be a clone URL such as `https://github.com/acme/web.git`, but \
             `{url}` contains a space"
        )));
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority = rest.split('/').next().unwrap_or_default();
        if matches!(scheme, "http" | "https")
            && authority
                .rsplit_once('@')
                .is_some_and(|(userinfo, _)| userinfo.contains(':'))
        {
            return Err(node.mark.error(
                "`repository` must not contain a password or token: they would be stored with \
                 the pipeline for everyone to read; put the token in the secret store and write \
                 `- checkout: {token: GIT_TOKEN}`",
            ));
        }
    }
    Ok(Some(url))
}

fn parse_trigger(node: &Node) -> Result<TriggerDef, PipelineError> {
    if let Value::Scalar(text, ScalarKind::Str) = &node.value
        && text == "generic"
    {
        return Ok(TriggerDef::Generic {});
    }
    let Value::Map(entries) = &node.value else {
        return Err(node.mark.error(format!(
            "a trigger is a mapping naming one source, such as `- github: {{repo: acme/web}}`, \
             but found {}",
            node.describe()
        )));
    };
    for e in entries {
        if TRIGGER_SOURCES.contains(&e.key.as_str()) {
            continue;
        }
        let is_field = GITHUB_KEYS
            .iter()
            .chain(GITLAB_KEYS)
            .chain(AZURE_DEVOPS_KEYS)
            .any(|k| *k == e.key);
        return Err(e.key_mark.error(if is_field {
            format!(
                "`{}` belongs inside the trigger's source: indent it under `github:`, `gitlab:` \
                 or `azure_devops:`, or write `- github: {{repo: acme/web, branches: [main]}}`",
                e.key
            )
        } else {
            unknown_key_message(&e.key, TRIGGER_SOURCES, "as a trigger source")
        }));
    }
    let source = match entries.as_slice() {
        [] => {
            return Err(node.mark.error(format!(
                "this trigger names no source; use one of {}",
                quoted_list(TRIGGER_SOURCES)
            )));
        }
        [one] => one,
        [first, second, ..] => {
            return Err(second.key_mark.error(format!(
                "a trigger names exactly one source, but this one has both `{}` and `{}`; make \
                 each its own list item",
                first.key, second.key
            )));
        }
    };

    let settings: &[Entry] = match &source.value.value {
        Value::Scalar(_, ScalarKind::Null) => &[],
        Value::Map(entries) => entries,
        _ => {
            return Err(source.value.mark.error(format!(
                "`{}` takes a mapping of settings, such as `{}`, but found {}",
                source.key,
                match source.key.as_str() {
                    "github" => "{repo: acme/web, branches: [main]}",
                    "gitlab" => "{project: acme/web, branches: [main]}",
                    "azure_devops" => "{repository: web, branches: [main]}",
                    _ => "{}",
                },
                source.value.describe()
            )));
        }
    };
    // Events and globs are checked here, so that a typo is an error when the pipeline is applied
    // rather than a trigger that silently never fires.
    let list_setting = |key: &str| -> Result<Vec<String>, PipelineError> {
        let Some(e) = get(settings, key) else {
            return Ok(Vec::new());
        };
        let items = text_list(&e.value, &format!("`{key}`"))?;
        for (item, mark) in &items {
            if key == "events" {
                let known = crate::hooks::triggers::known_events(&source.key);
                if !known.contains(&crate::hooks::triggers::normalise_event(item).as_str()) {
                    return Err(mark.error(format!(
                        "`{item}` is not an event a `{}` trigger can listen to; use {}",
                        source.key,
                        quoted_list(known)
                    )));
                }
            } else if let Err(problem) =
                crate::hooks::triggers::check_patterns(std::slice::from_ref(item))
            {
                return Err(mark.error(format!("`{key}` has {problem}")));
            }
        }
        Ok(items.into_iter().map(|(s, _)| s).collect())
    };
    let required = |key: &str, example: &str| -> Result<String, PipelineError> {
        match get(settings, key) {
            Some(e) => {
                let value = text(&e.value, &format!("`{key}`"))?.trim();
                if value.is_empty() {
                    return Err(e
                        .value
                        .mark
                        .error(format!("`{key}` is empty; write e.g. `{key}: {example}`")));
                }
                Ok(value.to_owned())
            }
            None => Err(source.key_mark.error(format!(
                "a `{}` trigger needs `{key}`, e.g. `{key}: {example}`",
                source.key
            ))),
        }
    };

    match source.key.as_str() {
        "github" => {
            check_keys(settings, GITHUB_KEYS, "in a `github` trigger")?;
            Ok(TriggerDef::Github {
                repo: required("repo", "acme/web")?,
                events: list_setting("events")?,
                branches: list_setting("branches")?,
                tags: list_setting("tags")?,
                paths: list_setting("paths")?,
            })
        }
        "gitlab" => {
            check_keys(settings, GITLAB_KEYS, "in a `gitlab` trigger")?;
            Ok(TriggerDef::Gitlab {
                project: required("project", "acme/web")?,
                events: list_setting("events")?,
                branches: list_setting("branches")?,
                tags: list_setting("tags")?,
                paths: list_setting("paths")?,
            })
        }
        "azure_devops" => {
            check_keys(settings, AZURE_DEVOPS_KEYS, "in an `azure_devops` trigger")?;
            Ok(TriggerDef::AzureDevops {
                repository: required("repository", "web")?,
                events: list_setting("events")?,
                branches: list_setting("branches")?,
                tags: list_setting("tags")?,
                paths: list_setting("paths")?,
            })
        }
        _ => {
            if let Some(e) = settings.first() {
                return Err(e.key_mark.error(format!(
                    "a `generic` trigger takes no settings, but found `{}`; write `- generic: {{}}`",
                    e.key
                )));
            }
            Ok(TriggerDef::Generic {})
        }
    }
}

/// Checks every `needs` entry names another job, then that the jobs form no cycle.
fn check_needs(jobs: &[JobDef], need_marks: &[Vec<Mark>]) -> Result<(), PipelineError> {
    let index: HashMap<&str, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.name.as_str(), i))
        .collect();
    let mut edges: Vec<Vec<usize>> = Vec::with_capacity(jobs.len());
    for (job, marks) in jobs.iter().zip(need_marks) {
        let mut seen = HashSet::new();
        let mut targets = Vec::with_capacity(job.needs.len());
        for (need, &mark) in job.needs.iter().zip(marks) {
            if *need == job.name {
                return Err(mark.error(format!("job `{need}` cannot need itself")));
            }
            let Some(&target) = index.get(need.as_str()) else {
                let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
                return Err(mark.error(format!(
                    "job `{}` needs `{need}`, but there is no such job; the jobs are: {}",
                    job.name,
                    names.join(", ")
                )));
            };
            if !seen.insert(target) {
                return Err(mark.error(format!(
                    "job `{}` lists `{need}` twice in `needs`",
                    job.name
                )));
            }
            targets.push(target);
        }
        edges.push(targets);
    }

    // An iterative depth-first search, so that a long chain of jobs cannot exhaust the stack.
    #[derive(Clone, Copy, PartialEq)]
    enum Visit {
        New,
        OnPath,
        Done,
    }
    let mut visit = vec![Visit::New; jobs.len()];
    for start in 0..jobs.len() {
        if visit[start] != Visit::New {
            continue;
        }
        // Each frame is a job and how many of its needs have been followed so far.
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        visit[start] = Visit::OnPath;
        while let Some(top) = path.last_mut() {
            let (job, followed) = *top;
            let Some(&next) = edges[job].get(followed) else {
                visit[job] = Visit::Done;
                path.pop();
                continue;
            };
            top.1 += 1;
            match visit[next] {
                Visit::New => {
                    visit[next] = Visit::OnPath;
                    path.push((next, 0));
                }
                Visit::OnPath => {
                    let from = path.iter().position(|&(j, _)| j == next).unwrap_or(0);
                    let mut names: Vec<&str> = path[from..]
                        .iter()
                        .map(|&(j, _)| jobs[j].name.as_str())
                        .collect();
                    names.push(jobs[next].name.as_str());
                    // The error points at the entry of the cycle's first job that leads on to the
                    // second; its counter was advanced past that entry when the search followed it.
                    let (first, first_followed) = path[from];
                    let mark = need_marks[first][first_followed - 1];
                    return Err(mark.error(format!(
                        "these jobs need each other in a cycle, so none of them could start: {}; \
                         remove one of these `needs`",
                        names.join(" -> ")
                    )));
                }
                Visit::Done => {}
            }
        }
    }
    Ok(())
}

/// Parses a duration: `30s`, `5m`, `2h`, `1h30m`, or a plain integer meaning seconds.
fn duration(node: &Node, what: &str) -> Result<u64, PipelineError> {
    let raw = match &node.value {
        Value::Scalar(text, ScalarKind::Int | ScalarKind::Str) => text.trim(),
        _ => {
            return Err(node.mark.error(format!(
                "{what} must be a duration such as `90s`, `30m`, `2h` or `1h30m`, but found {}",
                node.describe()
            )));
        }
    };
    let Some(secs) = duration_secs(raw) else {
        return Err(node.mark.error(format!(
            "{what} must be a duration such as `90s`, `30m`, `2h` or `1h30m` (a plain number \
             means seconds), but found `{raw}`"
        )));
    };
    if secs == 0 {
        return Err(node.mark.error(format!(
            "{what} must be longer than zero, but found `{raw}`"
        )));
    }
    if secs > MAX_TIMEOUT_SECS {
        return Err(node.mark.error(format!(
            "{what} may be at most 168h (seven days), but found `{raw}`"
        )));
    }
    Ok(secs)
}

/// The number of seconds in `text`, or `None` when it is not a duration.
///
/// Units must come in the order hours, minutes, seconds, each at most once.
pub(crate) fn duration_secs(text: &str) -> Option<u64> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok();
    }
    let mut total: u64 = 0;
    let mut rest = text;
    let mut previous_rank = u8::MAX;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let amount: u64 = rest[..digits].parse().ok()?;
        let (rank, unit) = match rest.as_bytes().get(digits)? {
            b'h' => (2, 3600),
            b'm' => (1, 60),
            b's' => (0, 1),
            _ => return None,
        };
        if rank >= previous_rank {
            return None;
        }
        previous_rank = rank;
        total = total.checked_add(amount.checked_mul(unit)?)?;
        rest = &rest[digits + 1..];
    }
    Some(total)
}

/// The entry for `key`, if the mapping has one.
fn get<'a>(entries: &'a [Entry], key: &str) -> Option<&'a Entry> {
    entries.iter().find(|e| e.key == key)
}

/// Rejects keys that are not in `allowed`, naming the allowed ones.
fn check_keys(entries: &[Entry], allowed: &[&str], context: &str) -> Result<(), PipelineError> {
    match entries.iter().find(|e| !allowed.contains(&e.key.as_str())) {
        Some(e) => Err(e
            .key_mark
            .error(unknown_key_message(&e.key, allowed, context))),
        None => Ok(()),
    }
}

fn unknown_key_message(key: &str, allowed: &[&str], context: &str) -> String {
    let hint = suggest(key, allowed)
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default();
    format!(
        "unknown key `{key}` {context}; the allowed keys are {}{hint}",
        quoted_list(allowed)
    )
}

/// The allowed key a mistyped one was probably meant to be: the same but for case and `-`, or
/// within two edits.
fn suggest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    let normal = key.to_ascii_lowercase().replace('-', "_");
    if let Some(same) = allowed.iter().find(|a| **a == normal) {
        return Some(same);
    }
    allowed
        .iter()
        .map(|a| (edit_distance(&normal, a), *a))
        .filter(|&(d, a)| d <= 2 && d < a.len().min(normal.len()))
        .min_by_key(|&(d, _)| d)
        .map(|(_, a)| a)
}

/// The Levenshtein distance between two short strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

fn quoted_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("`{i}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

fn map<'a>(node: &'a Node, what: &str) -> Result<&'a [Entry], PipelineError> {
    match &node.value {
        Value::Map(entries) => Ok(entries),
        _ => Err(node.mark.error(format!(
            "{what} must be a mapping of `key: value` lines, but found {}",
            node.describe()
        ))),
    }
}

/// A list; an empty value counts as an empty list.
fn list<'a>(node: &'a Node, what: &str) -> Result<&'a [Node], PipelineError> {
    match &node.value {
        Value::Seq(items) => Ok(items),
        Value::Scalar(_, ScalarKind::Null) => Ok(&[]),
        _ => Err(node.mark.error(format!(
            "{what} must be a list (`- item` lines or `[a, b]`), but found {}",
            node.describe()
        ))),
    }
}

/// The text of a scalar; numbers and true/false count as their text.
fn text<'a>(node: &'a Node, what: &str) -> Result<&'a str, PipelineError> {
    match &node.value {
        Value::Scalar(text, kind) if *kind != ScalarKind::Null => Ok(text),
        _ => Err(node.mark.error(format!(
            "{what} must be text, but found {}",
            node.describe()
        ))),
    }
}

/// Text that may be left empty (`~` or nothing) but not blank.
fn optional_text(node: &Node, what: &str) -> Result<Option<String>, PipelineError> {
    if node.is_null() {
        return Ok(None);
    }
    let value = text(node, what)?.trim();
    if value.is_empty() {
        return Err(node
            .mark
            .error(format!("{what} is blank; remove it or give it a value")));
    }
    Ok(Some(value.to_owned()))
}

/// A list of non-blank words, each with its position; a single word counts as a list of one and
/// an empty value as an empty list.
fn text_list(node: &Node, what: &str) -> Result<Vec<(String, Mark)>, PipelineError> {
    let items: &[Node] = match &node.value {
        Value::Scalar(_, ScalarKind::Null) => &[],
        Value::Scalar(..) => std::slice::from_ref(node),
        _ => list(node, what)?,
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let value = text(item, &format!("each item of {what}"))?.trim();
        if value.is_empty() {
            return Err(item
                .mark
                .error(format!("{what} has a blank item; remove it or fill it in")));
        }
        out.push((value.to_owned(), item.mark));
    }
    Ok(out)
}

/// At most `max` characters of `s`, ending in `…` when something was cut.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}
