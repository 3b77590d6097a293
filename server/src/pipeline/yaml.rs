//! A small YAML tree that remembers where every node came from.
//!
//! The pipeline checks need the position of any node, not only of the first syntax error, so the
//! tree is built from `saphyr-parser` events, which carry spans.
//! Building the tree here, rather than taking a ready-made one, also lets us reject what a
//! ready-made loader would silently accept: duplicate keys, several documents, custom tags, and
//! aliases that expand without bound.

use std::collections::{HashMap, HashSet};

use saphyr_parser::{Event, Parser, ScalarStyle, Span, Tag};

use super::PipelineError;

/// How deeply collections may nest; a pipeline needs about six levels, so this is generous while
/// keeping every recursive walk over the tree shallow.
const MAX_DEPTH: usize = 64;

/// How many nodes aliases may add in total, so that a small document full of nested aliases
/// (a "billion laughs") cannot make the server build an enormous tree.
const MAX_ALIAS_NODES: usize = 100_000;

/// A 1-based position in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
}

impl Mark {
    /// The start of the document, for problems that belong to no node.
    pub const START: Mark = Mark { line: 1, column: 1 };

    fn of(span: &Span) -> Mark {
        Mark {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }

    /// An error at this position.
    pub fn error(self, message: impl Into<String>) -> PipelineError {
        PipelineError {
            line: self.line,
            column: self.column,
            message: message.into(),
        }
    }
}

/// What a scalar resolves to under the YAML 1.2 core schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScalarKind {
    /// `~`, `null` or nothing at all.
    Null,
    /// `true` or `false`.
    Bool,
    /// An integer.
    Int,
    /// A floating-point number.
    Float,
    /// Anything else, and every quoted or block scalar.
    Str,
}

/// A node and where it starts.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// Where the node starts.
    pub mark: Mark,
    /// What the node holds.
    pub value: Value,
}

/// One key and its value in a mapping.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The key's text.
    pub key: String,
    /// Where the key starts.
    pub key_mark: Mark,
    /// The value.
    pub value: Node,
}

/// The contents of a node.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    /// A scalar with its source text (after YAML unescaping) and its resolved kind.
    Scalar(String, ScalarKind),
    /// A sequence, in order.
    Seq(Vec<Node>),
    /// A mapping, in source order, with no duplicate keys.
    Map(Vec<Entry>),
}

impl Node {
    /// A phrase naming what the node is, for messages such as "found a list".
    pub fn describe(&self) -> &'static str {
        match &self.value {
            Value::Scalar(_, ScalarKind::Null) => "nothing (an empty value)",
            Value::Scalar(_, ScalarKind::Bool) => "true/false",
            Value::Scalar(_, ScalarKind::Int | ScalarKind::Float) => "a number",
            Value::Scalar(_, ScalarKind::Str) => "text",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// Whether the node is an empty value (`~`, `null` or nothing).
    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Scalar(_, ScalarKind::Null))
    }

    /// How many nodes the tree holds, counting this one.
    fn count(&self) -> usize {
        1 + match &self.value {
            Value::Scalar(..) => 0,
            Value::Seq(items) => items.iter().map(Node::count).sum(),
            Value::Map(entries) => entries.iter().map(|e| 1 + e.value.count()).sum(),
        }
    }

    /// How many levels of collections the tree holds below and including this node.
    fn height(&self) -> usize {
        match &self.value {
            Value::Scalar(..) => 0,
            Value::Seq(items) => 1 + items.iter().map(Node::height).max().unwrap_or(0),
            Value::Map(entries) => 1 + entries.iter().map(|e| e.value.height()).max().unwrap_or(0),
        }
    }
}

/// A collection still being read.
enum Frame {
    Seq {
        mark: Mark,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        mark: Mark,
        anchor: usize,
        pairs: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

/// Reads one YAML document into a tree; `Ok(None)` when the input holds no document at all.
pub(crate) fn load(source: &str) -> Result<Option<Node>, PipelineError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut alias_nodes = 0usize;
    let mut documents = 0usize;
    let mut root: Option<Node> = None;

    for event in Parser::new_from_str(source) {
        let (event, span) = event.map_err(|e| {
            Mark {
                line: e.marker().line(),
                column: e.marker().col() + 1,
            }
            .error(format!("invalid YAML: {}", e.info()))
        })?;
        let mark = Mark::of(&span);
        let done = match event {
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => None,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(mark.error(
                        "a pipeline is one YAML document, but a second one starts here; \
                         remove the `---` line or put the other pipeline in its own file",
                    ));
                }
                None
            }
            Event::Scalar(text, style, anchor, tag) => {
                let kind = match tag {
                    Some(tag) if is_core(&tag, "str") => ScalarKind::Str,
                    Some(tag) => return Err(unsupported_tag(mark, &tag)),
                    None if style == ScalarStyle::Plain => resolve_plain(&text),
                    None => ScalarKind::Str,
                };
                Some((
                    Node {
                        mark,
                        value: Value::Scalar(text.into_owned(), kind),
                    },
                    anchor,
                ))
            }
            Event::SequenceStart(anchor, tag) => {
                check_collection_tag(mark, tag.as_deref(), "seq")?;
                check_depth(mark, stack.len() + 1)?;
                stack.push(Frame::Seq {
                    mark,
                    anchor,
                    items: Vec::new(),
                });
                None
            }
            Event::MappingStart(anchor, tag) => {
                check_collection_tag(mark, tag.as_deref(), "map")?;
                check_depth(mark, stack.len() + 1)?;
                stack.push(Frame::Map {
                    mark,
                    anchor,
                    pairs: Vec::new(),
                    key: None,
                });
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq {
                    mark,
                    anchor,
                    items,
                }) => Some((
                    Node {
                        mark,
                        value: Value::Seq(items),
                    },
                    anchor,
                )),
                _ => return Err(mark.error("invalid YAML: a list ends where none started")),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map {
                    mark,
                    anchor,
                    pairs,
                    ..
                }) => Some((
                    Node {
                        mark,
                        value: Value::Map(finish_mapping(pairs)?),
                    },
                    anchor,
                )),
                _ => return Err(mark.error("invalid YAML: a mapping ends where none started")),
            },
            Event::Alias(id) => {
                // The parser has already rejected aliases to unknown anchors, so a miss here means
                // the alias points into a collection that is still open, which cannot be copied.
                let Some(node) = anchors.get(&id) else {
                    return Err(
                        mark.error("an alias may not refer to a collection that contains it")
                    );
                };
                alias_nodes += node.count();
                if alias_nodes > MAX_ALIAS_NODES {
                    return Err(mark.error(format!(
                        "aliases expand to more than {MAX_ALIAS_NODES} nodes; \
                         write the repeated parts out or reuse fewer of them"
                    )));
                }
                check_depth(mark, stack.len() + node.height())?;
                Some((node.clone(), 0))
            }
        };

        let Some((node, anchor)) = done else { continue };
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { pairs, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => pairs.push((k, node)),
            },
        }
    }
    Ok(root)
}

/// Turns key/value pairs into entries: keys must be scalars and unique, and `<<` merge keys bring
/// in the entries of the mappings they name unless the mapping sets the key itself.
fn finish_mapping(pairs: Vec<(Node, Node)>) -> Result<Vec<Entry>, PipelineError> {
    let mut entries: Vec<Entry> = Vec::with_capacity(pairs.len());
    // Key to the line it was first set on; a map keeps large mappings from being quadratic.
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(pairs.len());
    let mut merged: Vec<Entry> = Vec::new();
    for (key, value) in pairs {
        let (text, kind) = match key.value {
            Value::Scalar(text, kind) => (text, kind),
            _ => {
                return Err(key.mark.error(format!(
                    "keys must be plain text, but this key is {}",
                    key.describe()
                )));
            }
        };
        if text == "<<" && kind == ScalarKind::Str {
            merged.extend(merge_sources(value)?);
            continue;
        }
        if let Some(line) = seen.get(&text) {
            return Err(key.mark.error(format!(
                "duplicate key `{text}`: it is already set on line {line}; keep only one"
            )));
        }
        seen.insert(text.clone(), key.mark.line);
        entries.push(Entry {
            key: text,
            key_mark: key.mark,
            value,
        });
    }
    for entry in merged {
        if !seen.contains_key(&entry.key) {
            seen.insert(entry.key.clone(), entry.key_mark.line);
            entries.push(entry);
        }
    }
    Ok(entries)
}

/// The entries a `<<` merge key brings in: one mapping, or a list of them, earlier ones winning.
fn merge_sources(value: Node) -> Result<Vec<Entry>, PipelineError> {
    let not_mapping = |node: &Node| {
        node.mark.error(format!(
            "`<<` merges a mapping (usually an alias such as `*defaults`) or a list of them, \
             but this is {}",
            node.describe()
        ))
    };
    match value.value {
        Value::Map(entries) => Ok(entries),
        Value::Seq(items) => {
            let mut out: Vec<Entry> = Vec::new();
            let mut seen: HashSet<String> = HashSet::new();
            for item in items {
                let entries = match item.value {
                    Value::Map(entries) => entries,
                    _ => return Err(not_mapping(&item)),
                };
                for entry in entries {
                    if seen.insert(entry.key.clone()) {
                        out.push(entry);
                    }
                }
            }
            Ok(out)
        }
        Value::Scalar(..) => Err(not_mapping(&value)),
    }
}

fn check_depth(mark: Mark, depth: usize) -> Result<(), PipelineError> {
    if depth > MAX_DEPTH {
        return Err(mark.error(format!(
            "the YAML nests more than {MAX_DEPTH} levels deep here; a pipeline never needs that many"
        )));
    }
    Ok(())
}

/// Whether `tag` is the core-schema tag `!!suffix`.
fn is_core(tag: &Tag, suffix: &str) -> bool {
    tag.handle == "tag:yaml.org,2002:" && tag.suffix == suffix
}

fn check_collection_tag(mark: Mark, tag: Option<&Tag>, suffix: &str) -> Result<(), PipelineError> {
    match tag {
        Some(tag) if !is_core(tag, suffix) => Err(unsupported_tag(mark, tag)),
        _ => Ok(()),
    }
}

fn unsupported_tag(mark: Mark, tag: &Tag) -> PipelineError {
    let shown = if tag.handle == "tag:yaml.org,2002:" {
        format!("!!{}", tag.suffix)
    } else {
        format!("{}{}", tag.handle, tag.suffix)
    };
    mark.error(format!(
        "YAML tags such as `{shown}` are not supported here; remove the tag (quote the value if it \
         must be text)"
    ))
}

/// Resolves a plain (unquoted) scalar under the YAML 1.2 core schema.
fn resolve_plain(text: &str) -> ScalarKind {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return ScalarKind::Null,
        "true" | "True" | "TRUE" | "false" | "False" | "FALSE" => return ScalarKind::Bool,
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => return ScalarKind::Float,
        _ => {}
    }
    let digits = |s: &str, radix: u32| !s.is_empty() && s.chars().all(|c| c.is_digit(radix));
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits(unsigned, 10)
        || text.strip_prefix("0o").is_some_and(|s| digits(s, 8))
        || text.strip_prefix("0x").is_some_and(|s| digits(s, 16))
    {
        return ScalarKind::Int;
    }
    if is_float(unsigned) {
        return ScalarKind::Float;
    }
    ScalarKind::Str
}

/// Matches `(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?` after an optional sign.
fn is_float(text: &str) -> bool {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text, None),
    };
    let all_digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => {
            all_digits(whole) && all_digits(fraction) && (!whole.is_empty() || !fraction.is_empty())
        }
        None => !mantissa.is_empty() && all_digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && all_digits(e)
    });
    mantissa_ok && exponent_ok
}
