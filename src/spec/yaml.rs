//! A YAML loader that keeps where every node came from.
//!
//! serde's YAML backends lose positions after parsing, but berth promises that every spec
//! error names its file, line and column. So specs are parsed into a small tree of nodes
//! carrying their source position, turned into JSON values for serde, and errors found
//! later (by serde or by validation) are located by walking the tree along their field path.
//!
//! Scalars follow the YAML 1.2 core schema: plain `true`/`false`, `null`/`~`, integers and
//! floats are typed; everything quoted or block-styled is a string.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A position in a source file, 1-based like an editor shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    fn from_marker(m: Marker) -> Self {
        // yaml-rust2 lines are 1-based, columns 0-based.
        Pos {
            line: m.line().max(1),
            col: m.col() + 1,
        }
    }
}

/// One YAML node with its position.
#[derive(Debug, Clone)]
pub struct Node {
    pub pos: Pos,
    pub kind: NodeKind,
}

#[derive(Debug, Clone)]
pub enum NodeKind {
    Scalar {
        value: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries keep source order; the key's own position is kept for "unknown field" errors.
    Map(Vec<MapEntry>),
}

#[derive(Debug, Clone)]
pub struct MapEntry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

/// A YAML problem at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

/// Parses every document of `text`. Each document is returned with the position of its start.
pub fn load_documents(text: &str) -> Result<Vec<Node>, YamlError> {
    let mut builder = TreeBuilder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, true).map_err(|e| YamlError {
        pos: Pos::from_marker(*e.marker()),
        message: e.info().to_string(),
    })?;
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.documents)
}

/// Builds [`Node`] trees from parser events.
#[derive(Default)]
struct TreeBuilder {
    documents: Vec<Node>,
    /// Open collections: the node being filled and, for maps, a pending key.
    stack: Vec<(Node, Option<(String, Pos)>)>,
    /// Anchored nodes by anchor id, for aliases.
    anchors: HashMap<usize, Node>,
    /// Anchor ids of the open collections, parallel to `stack`.
    open_anchors: Vec<usize>,
    /// The first structural error (duplicate key, non-scalar key); parsing continues but is ignored.
    error: Option<YamlError>,
}

impl TreeBuilder {
    fn push_value(&mut self, node: Node) {
        if self.error.is_some() {
            return;
        }
        let Some((parent, pending_key)) = self.stack.last_mut() else {
            self.documents.push(node);
            return;
        };
        match &mut parent.kind {
            NodeKind::Seq(items) => items.push(node),
            NodeKind::Map(entries) => match pending_key.take() {
                None => match node.kind {
                    NodeKind::Scalar { value, .. } => {
                        if entries.iter().any(|e| e.key == value) {
                            self.error = Some(YamlError {
                                pos: node.pos,
                                message: format!("duplicate key `{value}`"),
                            });
                        } else {
                            *pending_key = Some((value, node.pos));
                        }
                    }
                    _ => {
                        self.error = Some(YamlError {
                            pos: node.pos,
                            message: "mapping keys must be plain strings".to_string(),
                        })
                    }
                },
                Some((key, key_pos)) => entries.push(MapEntry {
                    key,
                    key_pos,
                    value: node,
                }),
            },
            NodeKind::Scalar { .. } => unreachable!("scalars are never on the stack"),
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from_marker(mark);
        match ev {
            Event::Scalar(value, style, anchor, tag) => {
                // An explicit `!!str` tag makes a plain scalar a string.
                let tagged_str = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let node = Node {
                    pos,
                    kind: NodeKind::Scalar {
                        value,
                        plain: style == TScalarStyle::Plain && !tagged_str,
                    },
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push_value(node);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push((
                    Node {
                        pos,
                        kind: NodeKind::Seq(Vec::new()),
                    },
                    None,
                ));
                self.open_anchors.push(anchor);
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push((
                    Node {
                        pos,
                        kind: NodeKind::Map(Vec::new()),
                    },
                    None,
                ));
                self.open_anchors.push(anchor);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((mut node, _)) = self.stack.pop() {
                    // A block mapping's start mark can fall after its first key; a mapping
                    // is where its first key is.
                    if let NodeKind::Map(entries) = &node.kind
                        && let Some(first) = entries.first()
                    {
                        node.pos = node.pos.min(first.key_pos);
                    }
                    let anchor = self.open_anchors.pop().unwrap_or(0);
                    if anchor > 0 {
                        self.anchors.insert(anchor, node.clone());
                    }
                    self.push_value(node);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(node) => {
                    let node = Node {
                        pos,
                        kind: node.kind.clone(),
                    };
                    self.push_value(node);
                }
                None => {
                    if self.error.is_none() {
                        self.error = Some(YamlError {
                            pos,
                            message: "unknown alias".to_string(),
                        });
                    }
                }
            },
            Event::Nothing
            | Event::DocumentEnd
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart => {}
        }
    }
}

impl Node {
    /// Converts the tree into a JSON value for serde, typing plain scalars by the core schema.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            NodeKind::Scalar { value, plain } => {
                if !plain {
                    return Value::String(value.clone());
                }
                scalar_to_json(value)
            }
            NodeKind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeKind::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.to_json()))
                    .collect(),
            ),
        }
    }

    /// A short word for the node's type, for error messages.
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            NodeKind::Scalar { value, plain: true } if scalar_to_json(value).is_null() => "null",
            NodeKind::Scalar { .. } => "a scalar",
            NodeKind::Seq(_) => "a sequence",
            NodeKind::Map(_) => "a mapping",
        }
    }

    /// Finds the position best describing `path` (dotted fields, `[n]` indexes).
    /// With `key` set, a map entry's key position is returned (for unknown fields);
    /// otherwise its value's. Falls back to the deepest node that exists.
    pub fn locate(&self, path: &[PathSeg], key: bool) -> Pos {
        let mut node = self;
        let mut pos = self.pos;
        for (i, seg) in path.iter().enumerate() {
            let last = i + 1 == path.len();
            match (seg, &node.kind) {
                (PathSeg::Field(name), NodeKind::Map(entries)) => {
                    match entries.iter().find(|e| &e.key == name) {
                        Some(e) => {
                            pos = if last && key { e.key_pos } else { e.value.pos };
                            node = &e.value;
                        }
                        None => return pos,
                    }
                }
                (PathSeg::Index(n), NodeKind::Seq(items)) => match items.get(*n) {
                    Some(item) => {
                        pos = item.pos;
                        node = item;
                    }
                    None => return pos,
                },
                _ => return pos,
            }
        }
        pos
    }
}

fn scalar_to_json(value: &str) -> serde_json::Value {
    use serde_json::Value;
    match value {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let looks_numeric = value
        .trim_start_matches(['-', '+'])
        .starts_with(|c: char| c.is_ascii_digit() || c == '.');
    if looks_numeric {
        if let Ok(i) = value.parse::<i64>() {
            return Value::from(i);
        }
        if let Ok(u) = value.parse::<u64>() {
            return Value::from(u);
        }
        if let Some(hex) = value.strip_prefix("0x")
            && let Ok(i) = i64::from_str_radix(hex, 16)
        {
            return Value::from(i);
        }
        if let Some(oct) = value.strip_prefix("0o")
            && let Ok(i) = i64::from_str_radix(oct, 8)
        {
            return Value::from(i);
        }
        if let Ok(f) = value.parse::<f64>()
            && f.is_finite()
            && let Some(n) = serde_json::Number::from_f64(f)
        {
            return Value::Number(n);
        }
    }
    Value::String(value.to_string())
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSeg {
    Field(String),
    Index(usize),
}

/// Renders a path the way errors show it: `deploy.max_surge`, `domains[1]`.
pub fn render_path(path: &[PathSeg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            PathSeg::Field(f) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(f);
            }
            PathSeg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_types() {
        let docs =
            load_documents("a: 1\nb:\n  - x\n  - 'true'\nc: true\n---\nname: two\n").unwrap();
        assert_eq!(docs.len(), 2);
        let json = docs[0].to_json();
        assert_eq!(
            json,
            serde_json::json!({"a": 1, "b": ["x", "true"], "c": true})
        );
        let path = [PathSeg::Field("b".into()), PathSeg::Index(1)];
        assert_eq!(docs[0].locate(&path, false), Pos { line: 4, col: 5 });
        assert_eq!(
            docs[0].locate(&[PathSeg::Field("c".into())], true),
            Pos { line: 5, col: 1 }
        );
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = load_documents("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.pos, Pos { line: 2, col: 1 });
        assert!(err.message.contains("duplicate key `a`"));
    }

    #[test]
    fn syntax_errors_are_located() {
        let err = load_documents("a: [1, 2\nb: c\n").unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
    }

    #[test]
    fn aliases_are_expanded() {
        let docs = load_documents("base: &b {x: 1}\nother: *b\n").unwrap();
        assert_eq!(docs[0].to_json()["other"], serde_json::json!({"x": 1}));
    }
}
