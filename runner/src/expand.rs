//! `${NAME}` expansion in `kubectl`/`helm` arguments, and the `{0}` shell command line.
//!
//! Arguments arrive already split into words; expansion happens inside each word afterwards, so a
//! value with spaces, quotes or `; rm -rf /` stays one literal argument and is never re-split or
//! interpreted by a shell.

use std::collections::BTreeMap;
use std::path::Path;

/// Why an argument could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    /// `${NAME}` names no variable of the job.
    #[error(
        "`${{{name}}}` in argument `{arg}` is not defined: define `{name}` in the pipeline's `variables` or `secrets`, or pass it when triggering the run"
    )]
    Undefined {
        /// The variable's name.
        name: String,
        /// The argument as written.
        arg: String,
    },
    /// `${` without a closing `}` or with a name that is not `[A-Za-z_][A-Za-z0-9_]*`.
    #[error(
        "argument `{arg}` has a malformed variable reference at byte {at}: write `${{NAME}}` with a name of letters, digits and underscores"
    )]
    Malformed {
        /// The argument as written.
        arg: String,
        /// Byte position of the `$`.
        at: usize,
    },
}

/// Whether `name` is a valid variable (and environment variable) name.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Expands every `${NAME}` in `arg` with `lookup(NAME)`; a `$` not followed by `{` stays as it is.
pub fn expand_with<'a>(
    arg: &str,
    lookup: impl Fn(&str) -> Option<std::borrow::Cow<'a, str>>,
) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    let mut consumed = 0;
    while let Some(pos) = rest.find("${") {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let Some(end) = after.find('}') else {
            return Err(ExpandError::Malformed {
                arg: arg.into(),
                at: consumed + pos,
            });
        };
        let name = &after[..end];
        if !is_valid_name(name) {
            return Err(ExpandError::Malformed {
                arg: arg.into(),
                at: consumed + pos,
            });
        }
        match lookup(name) {
            Some(value) => out.push_str(&value),
            None => {
                return Err(ExpandError::Undefined {
                    name: name.into(),
                    arg: arg.into(),
                });
            }
        }
        let skip = pos + 2 + end + 1;
        consumed += skip;
        rest = &rest[skip..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands every argument from `vars`.
pub fn expand_args(
    args: &[String],
    vars: &BTreeMap<String, String>,
) -> Result<Vec<String>, ExpandError> {
    args.iter()
        .map(|a| expand_with(a, |n| vars.get(n).map(|v| v.as_str().into())))
        .collect()
}

/// Expands every argument for display: values of the names in `hidden` (secrets) are shown as
/// their `${NAME}` reference instead of their value.
pub fn display_args(
    args: &[String],
    vars: &BTreeMap<String, String>,
    hidden: &BTreeMap<String, String>,
) -> String {
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            expand_with(a, |n| {
                if hidden.contains_key(n) {
                    Some(format!("${{{n}}}").into())
                } else {
                    vars.get(n).map(|v| v.as_str().into())
                }
            })
            .unwrap_or_else(|_| a.clone())
        })
        .collect();
    shell_words::join(shown)
}

/// Why a shell command line could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellLineError {
    /// Quotes do not match.
    #[error("the shell command line `{0}` has unmatched quotes")]
    Unbalanced(String),
    /// Nothing to run.
    #[error("the shell command line is empty: set `shell` to e.g. `bash -eo pipefail {{0}}`")]
    Empty,
    /// The script path is not UTF-8.
    #[error("the script path {0} is not valid UTF-8; choose a work_dir whose path is")]
    NotUtf8(String),
}

/// Splits a shell command line like a shell would and puts `script` where `{0}` stands; when the
/// line has no `{0}`, the script path is appended as the last argument.
pub fn shell_command(line: &str, script: &Path) -> Result<Vec<String>, ShellLineError> {
    let script = script
        .to_str()
        .ok_or_else(|| ShellLineError::NotUtf8(script.display().to_string()))?;
    let words = shell_words::split(line).map_err(|_| ShellLineError::Unbalanced(line.into()))?;
    if words.is_empty() {
        return Err(ShellLineError::Empty);
    }
    let mut substituted = false;
    let mut argv: Vec<String> = words
        .into_iter()
        .map(|w| {
            if w.contains("{0}") {
                substituted = true;
                w.replace("{0}", script)
            } else {
                w
            }
        })
        .collect();
    if !substituted {
        argv.push(script.to_string());
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn expands_inside_words_after_splitting() {
        let v = vars(&[("NAMESPACE", "web"), ("TAG", "1.2.3")]);
        let out = expand_args(
            &args(&[
                "apply",
                "-n",
                "${NAMESPACE}",
                "--set=image.tag=${TAG}-${NAMESPACE}",
            ]),
            &v,
        )
        .unwrap();
        assert_eq!(
            out,
            args(&["apply", "-n", "web", "--set=image.tag=1.2.3-web"])
        );
    }

    #[test]
    fn a_hostile_value_stays_one_literal_argument() {
        let v = vars(&[("NS", "web; rm -rf / && echo \"pwned\" $(id)")]);
        let out = expand_args(&args(&["get", "pods", "-n", "${NS}"]), &v).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out[3], "web; rm -rf / && echo \"pwned\" $(id)");
    }

    #[test]
    fn values_are_not_expanded_again() {
        let v = vars(&[("A", "${B}"), ("B", "no")]);
        assert_eq!(expand_args(&args(&["${A}"]), &v).unwrap(), args(&["${B}"]));
    }

    #[test]
    fn an_undefined_variable_is_an_error_that_names_it() {
        let err = expand_args(&args(&["-n", "${MISSING}"]), &vars(&[])).unwrap_err();
        assert_eq!(
            err,
            ExpandError::Undefined {
                name: "MISSING".into(),
                arg: "${MISSING}".into()
            }
        );
        assert!(err.to_string().contains("`${MISSING}`"), "{err}");
    }

    #[test]
    fn malformed_references_are_errors_and_lone_dollars_stay() {
        assert!(matches!(
            expand_args(&args(&["${OPEN"]), &vars(&[])),
            Err(ExpandError::Malformed { at: 0, .. })
        ));
        assert!(matches!(
            expand_args(&args(&["x${a-b}"]), &vars(&[])),
            Err(ExpandError::Malformed { at: 1, .. })
        ));
        assert_eq!(
            expand_args(&args(&["$HOME", "cost$", "{.items[*]}"]), &vars(&[])).unwrap(),
            args(&["$HOME", "cost$", "{.items[*]}"])
        );
    }

    #[test]
    fn display_hides_secret_values() {
        let v = vars(&[("NS", "web"), ("PASSWORD", "hunter2")]);
        let hidden = vars(&[("PASSWORD", "hunter2")]);
        let shown = display_args(
            &args(&["upgrade", "-n", "${NS}", "--set", "pw=${PASSWORD}"]),
            &v,
            &hidden,
        );
        assert_eq!(shown, "upgrade -n web --set 'pw=${PASSWORD}'");
    }

    #[test]
    fn shell_line_puts_the_script_where_0_stands() {
        let script = Path::new("/tmp/o p/step-1.sh");
        assert_eq!(
            shell_command("bash -eo pipefail {0}", script).unwrap(),
            args(&["bash", "-eo", "pipefail", "/tmp/o p/step-1.sh"])
        );
        assert_eq!(
            shell_command("pwsh -command \". '{0}'\"", script).unwrap(),
            args(&["pwsh", "-command", ". '/tmp/o p/step-1.sh'"])
        );
        assert_eq!(
            shell_command("sh -e", script).unwrap(),
            args(&["sh", "-e", "/tmp/o p/step-1.sh"])
        );
        assert_eq!(shell_command("  ", script), Err(ShellLineError::Empty));
        assert!(matches!(
            shell_command("bash 'x {0}", script),
            Err(ShellLineError::Unbalanced(_))
        ));
    }
}
