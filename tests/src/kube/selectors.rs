//! Label and field selectors, as `?labelSelector=` and `?fieldSelector=` carry them.

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits at commas outside parentheses, so that `env in (a,b),tier=web` is two terms.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

impl LabelSelector {
    /// Parses the selector grammar of the real API server (`a=b`, `a==b`, `a!=b`, `a`, `!a`,
    /// `a in (x,y)`, `a notin (x,y)`); the error says which term was not understood.
    pub fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            let requirement = if let Some(open) = term.find('(') {
                let close = term
                    .rfind(')')
                    .ok_or_else(|| format!("unclosed parenthesis in {term:?}"))?;
                let values: Vec<String> = term[open + 1..close]
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect();
                let head = term[..open].trim();
                if let Some(key) = head.strip_suffix(" notin") {
                    Requirement::NotIn(key.trim().to_string(), values)
                } else if let Some(key) = head.strip_suffix(" in") {
                    Requirement::In(key.trim().to_string(), values)
                } else {
                    return Err(format!("unknown set operator in {term:?}"));
                }
            } else if let Some(key) = term.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_string())
            } else if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==") {
                Requirement::Equals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once('=') {
                Requirement::Equals(k.trim().to_string(), v.trim().to_string())
            } else {
                Requirement::Exists(term.to_string())
            };
            requirements.push(requirement);
        }
        Ok(LabelSelector(requirements))
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        })
    }
}

/// A parsed field selector: `path=value`, `path==value` or `path!=value` terms, where the path
/// is any dotted path into the object (`metadata.name`, `type`, `status.phase`).
///
/// The real server accepts only a few fields per kind; the stand-in accepts any path and
/// compares its string value, a missing field counting as the empty string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses the selector; the error says which term was not understood.
    pub fn parse(text: &str) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for term in split_terms(text) {
            let (path, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            terms.push((path.trim().to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    /// Whether every term holds for `object`.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, value)| {
            let mut field = object;
            for part in path.split('.') {
                field = &field[part];
            }
            let text = match field {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (text == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_follow_the_real_grammar() {
        let object =
            json!({"metadata": {"labels": {"owner": "helm", "name": "web", "status": "deployed"}}});
        let holds = |s: &str| LabelSelector::parse(s).unwrap().matches(&object);
        assert!(holds("owner=helm,name=web"));
        assert!(holds("owner==helm, status in (deployed,failed)"));
        assert!(holds("status notin (superseded),!missing,owner"));
        assert!(holds("missing!=x"));
        assert!(!holds("owner=helm,name=api"));
        assert!(!holds("status notin (deployed)"));
        assert!(!holds("missing"));
        assert!(holds(""));
    }

    #[test]
    fn field_selectors_compare_dotted_paths() {
        let object =
            json!({"metadata": {"name": "web", "namespace": "prod"}, "type": "helm.sh/release.v1"});
        let holds = |s: &str| FieldSelector::parse(s).unwrap().matches(&object);
        assert!(holds("metadata.name=web,metadata.namespace==prod"));
        assert!(holds("type=helm.sh/release.v1,status.phase!=Running"));
        assert!(!holds("metadata.name=api"));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
