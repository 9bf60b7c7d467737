//! JSON Schema, the subset tool calls and structured output use: compiled to a GBNF grammar (so
//! sampling can only produce matching JSON) and checked against values (so a parsed call's
//! arguments are known to match).
//!
//! Enforced by the grammar: `type` (one or a list), `properties`, `required`,
//! `additionalProperties` (`false`, `true` or absent), `items`, `minItems`, `maxItems`, `enum`,
//! `const`, `anyOf`, `oneOf`, `minLength`, `maxLength`. Checked after generation only: `minimum`,
//! `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `multipleOf`. Annotations (`title`,
//! `description`, `default`, `examples`, `format`, `$schema`, `$id`, `$comment`, `deprecated`,
//! `readOnly`, `writeOnly`) change nothing. Anything else (`$ref`, `allOf`, `not`, `pattern`,
//! `patternProperties`, `if`, ...) is refused with an error naming the construct and where it is.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Why a schema cannot be compiled, and where (`properties.path.items`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// A construct this module does not handle.
    #[error(
        "unsupported JSON Schema construct `{construct}` at `{at}`: lm-sandbox cannot enforce it"
    )]
    Unsupported { construct: String, at: String },
    /// Bounds no value can meet (`minItems` above `maxItems`).
    #[error("`{at}`: {reason}, so no value can match the schema")]
    Unsatisfiable { at: String, reason: String },
    /// Bounds or a shape whose grammar would be too large to build or to sample with.
    #[error("`{at}`: {reason}")]
    TooLarge { at: String, reason: String },
}

/// Most repetitions a bound (`minItems`, `minLength`, ...) may ask the grammar for: llama.cpp's own
/// limit. A larger maximum is enforced by validation only; a larger minimum is refused.
pub const MAX_BOUND: u64 = crate::engine::grammar::MAX_REPETITION;
/// Schemas nested deeper than this are refused.
pub const MAX_DEPTH: usize = 32;
/// Largest grammar text a schema may compile to.
pub const MAX_GRAMMAR_BYTES: usize = 1 << 20;

const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "format",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
];
const CHECKED_ONLY: &[&str] = &[
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];
const ENFORCED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "minLength",
    "maxLength",
];

/// The grammar rules every compiled schema may use.
const PRIMITIVES: &str = r#"ws ::= [ \t\n]{0,20}
char ::= [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )
string ::= "\"" char* "\""
integer ::= "-"? ( "0" | [1-9] [0-9]{0,15} )
number ::= integer ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?
boolean ::= "true" | "false"
null ::= "null"
value ::= object | array | string | number | boolean | null
object ::= "{" ws ( string ws ":" ws value ( ws "," ws string ws ":" ws value )* )? ws "}"
array ::= "[" ws ( value ( ws "," ws value )* )? ws "]"
"#;

/// Builds a GBNF grammar out of schemas: each compiled schema becomes a named rule.
#[derive(Debug, Default)]
pub struct GrammarBuilder {
    rules: BTreeMap<String, String>,
    counter: usize,
    /// Bytes of rule text so far, bounded by [`MAX_GRAMMAR_BYTES`].
    bytes: usize,
}

impl GrammarBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        let clean: String = hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let clean = clean.trim_matches('-');
        let clean = if clean.is_empty() { "r" } else { clean };
        format!("{clean}-{}", self.counter)
    }

    /// Adds a rule `name ::= body` (with a fresh name based on `hint`) and returns the name.
    pub fn rule(&mut self, hint: &str, body: String) -> String {
        let name = self.fresh(hint);
        self.bytes += name.len() + body.len() + 6;
        self.rules.insert(name.clone(), body);
        name
    }

    /// Compiles `schema` (found at `at`) into a rule; returns the rule's name.
    pub fn schema(&mut self, schema: &Value, at: &str) -> Result<String, SchemaError> {
        // Each level of nesting adds one of these to the path.
        let depth = at.matches(".properties.").count()
            + at.matches(".items").count()
            + at.matches("Of[").count();
        if depth > MAX_DEPTH {
            return Err(SchemaError::TooLarge {
                at: at.into(),
                reason: format!("schemas nested deeper than {MAX_DEPTH} levels are not supported"),
            });
        }
        check(schema, at)?;
        let body = self.body(schema, at)?;
        self.budget(at, body.len())?;
        Ok(self.rule(at, body))
    }

    /// Refuses to grow the grammar past [`MAX_GRAMMAR_BYTES`].
    fn budget(&self, at: &str, more: usize) -> Result<(), SchemaError> {
        if self.bytes.saturating_add(more) > MAX_GRAMMAR_BYTES {
            return Err(SchemaError::TooLarge {
                at: at.into(),
                reason: format!(
                    "the schema compiles to a grammar over {} KiB; simplify it",
                    MAX_GRAMMAR_BYTES >> 10
                ),
            });
        }
        Ok(())
    }

    fn body(&mut self, schema: &Value, at: &str) -> Result<String, SchemaError> {
        let map = match schema {
            Value::Bool(true) => return Ok("value".into()),
            Value::Bool(false) => {
                return Err(SchemaError::Unsupported {
                    construct: "false".into(),
                    at: at.into(),
                })
            }
            Value::Object(map) => map,
            _ => {
                return Err(SchemaError::Unsupported {
                    construct: "a schema that is not an object".into(),
                    at: at.into(),
                })
            }
        };
        if let Some(value) = map.get("const") {
            return Ok(literal(value));
        }
        if let Some(values) = map.get("enum").and_then(Value::as_array) {
            let alternatives: Vec<String> = values.iter().map(literal).collect();
            return Ok(format!("( {} )", alternatives.join(" | ")));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(options) = map.get(key).and_then(Value::as_array) {
                let mut names = Vec::new();
                for (i, option) in options.iter().enumerate() {
                    names.push(self.schema(option, &format!("{at}.{key}[{i}]"))?);
                }
                return Ok(format!("( {} )", names.join(" | ")));
            }
        }
        let types: Vec<&str> = match map.get("type") {
            None => return Ok("value".into()),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            Some(_) => {
                return Err(SchemaError::Unsupported {
                    construct: "type".into(),
                    at: at.into(),
                })
            }
        };
        let mut alternatives = Vec::new();
        for kind in types {
            alternatives.push(match kind {
                "string" => string_body(map, at)?,
                "integer" => "integer".into(),
                "number" => "number".into(),
                "boolean" => "boolean".into(),
                "null" => "null".into(),
                "object" => self.object_body(map, at)?,
                "array" => self.array_body(map, at)?,
                other => {
                    return Err(SchemaError::Unsupported {
                        construct: format!("type \"{other}\""),
                        at: at.into(),
                    })
                }
            });
        }
        Ok(format!("( {} )", alternatives.join(" | ")))
    }

    fn object_body(&mut self, map: &Map<String, Value>, at: &str) -> Result<String, SchemaError> {
        let empty = Map::new();
        let properties = map
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        if properties.is_empty() {
            return Ok(match map.get("additionalProperties") {
                Some(Value::Bool(false)) => r#""{" ws "}""#.into(),
                _ => "object".into(),
            });
        }
        let required: Vec<&str> = map
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut mandatory = Vec::new();
        let mut optional = Vec::new();
        for (key, sub) in properties {
            let value = self.schema(sub, &format!("{at}.properties.{key}"))?;
            let pair = format!(
                r#"{} ws ":" ws {value}"#,
                literal(&Value::String(key.clone()))
            );
            if required.contains(&key.as_str()) {
                mandatory.push(pair);
            } else {
                optional.push(pair);
            }
        }
        let list = if mandatory.is_empty() {
            // Any non-empty run of the optional properties, in order, or none: quadratic in their
            // number, so its size is checked before it is built.
            let pairs: usize = optional.iter().map(|p| p.len() + 16).sum();
            self.budget(at, pairs.saturating_mul(optional.len()) / 2)?;
            let mut firsts = Vec::new();
            for i in 0..optional.len() {
                let rest: String = optional[i + 1..]
                    .iter()
                    .map(|p| format!(r#" ( ws "," ws {p} )?"#))
                    .collect();
                firsts.push(format!("{}{rest}", optional[i]));
            }
            format!("( {} )?", firsts.join(" | "))
        } else {
            let mut list = mandatory.join(r#" ws "," ws "#);
            for p in &optional {
                list.push_str(&format!(r#" ( ws "," ws {p} )?"#));
            }
            list
        };
        Ok(format!(r#""{{" ws {list} ws "}}""#))
    }

    fn array_body(&mut self, map: &Map<String, Value>, at: &str) -> Result<String, SchemaError> {
        let item = match map.get("items") {
            None => "value".to_string(),
            Some(items) => self.schema(items, &format!("{at}.items"))?,
        };
        let (min, max) = bounds(map, "minItems", "maxItems", at)?;
        let body = match (min, max) {
            (_, Some(0)) => String::new(),
            (0, max) => format!("( {item} {} )?", more_rest(&item, 0, max.map(|m| m - 1))),
            (min, max) => format!("{item} {}", more_rest(&item, min - 1, max.map(|m| m - 1))),
        };
        Ok(format!(r#""[" ws {body} ws "]""#))
    }

    /// The whole grammar with `root ::= root_body`, checked as every grammar is before llama.cpp
    /// sees it. `at` names the schema for the error.
    pub fn finish_checked(self, root_body: &str, at: &str) -> Result<String, SchemaError> {
        let grammar = self.finish(root_body);
        crate::engine::grammar::check(&grammar).map_err(|e| SchemaError::TooLarge {
            at: at.into(),
            reason: format!("its grammar is refused: {e}"),
        })?;
        Ok(grammar)
    }

    /// The whole grammar with `root ::= root_body`.
    pub fn finish(self, root_body: &str) -> String {
        let mut out = format!("root ::= {root_body}\n");
        for (name, body) in &self.rules {
            out.push_str(&format!("{name} ::= {body}\n"));
        }
        out.push_str(PRIMITIVES);
        out
    }
}

/// `( ws "," ws item ){min,max}` for the items after the first.
fn more_rest(item: &str, min: u64, max: Option<u64>) -> String {
    let unit = format!(r#"( ws "," ws {item} )"#);
    match max {
        Some(max) => format!("{unit}{{{min},{max}}}"),
        None => format!("{unit}{{{min},}}"),
    }
}

/// A `min`/`max` pair of bounds for the grammar: contradictions and minimums over
/// [`MAX_BOUND`] are refused; a maximum over it is left to validation (the grammar has none).
fn bounds(
    map: &Map<String, Value>,
    min_key: &str,
    max_key: &str,
    at: &str,
) -> Result<(u64, Option<u64>), SchemaError> {
    let min = map.get(min_key).and_then(Value::as_u64).unwrap_or(0);
    let max = map.get(max_key).and_then(Value::as_u64);
    if let Some(max) = max.filter(|&max| max < min) {
        return Err(SchemaError::Unsatisfiable {
            at: at.into(),
            reason: format!("`{min_key}` ({min}) is above `{max_key}` ({max})"),
        });
    }
    if min > MAX_BOUND {
        return Err(SchemaError::TooLarge {
            at: at.into(),
            reason: format!(
                "`{min_key}` ({min}) is over {MAX_BOUND}, more than a grammar can enforce"
            ),
        });
    }
    Ok((min, max.filter(|&max| max <= MAX_BOUND)))
}

fn string_body(map: &Map<String, Value>, at: &str) -> Result<String, SchemaError> {
    let (min, max) = bounds(map, "minLength", "maxLength", at)?;
    Ok(match (min, max) {
        (0, None) => "string".into(),
        (min, Some(max)) => format!(r#""\"" char{{{min},{max}}} "\"""#),
        (min, None) => format!(r#""\"" char{{{min},}} "\"""#),
    })
}

/// A GBNF literal matching exactly the JSON text of `value`.
pub fn literal(value: &Value) -> String {
    let text = value.to_string();
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Refuses a schema with a construct outside the supported subset (recursively).
pub fn check(schema: &Value, at: &str) -> Result<(), SchemaError> {
    let Value::Object(map) = schema else {
        return match schema {
            Value::Bool(_) => Ok(()),
            _ => Err(SchemaError::Unsupported {
                construct: "a schema that is not an object".into(),
                at: at.into(),
            }),
        };
    };
    for key in map.keys() {
        let known = ANNOTATIONS.contains(&key.as_str())
            || CHECKED_ONLY.contains(&key.as_str())
            || ENFORCED.contains(&key.as_str());
        if !known {
            return Err(SchemaError::Unsupported {
                construct: key.clone(),
                at: at.into(),
            });
        }
    }
    if let Some(extra) = map.get("additionalProperties") {
        if !extra.is_boolean() {
            return Err(SchemaError::Unsupported {
                construct: "additionalProperties (a schema)".into(),
                at: at.into(),
            });
        }
    }
    Ok(())
}

/// Whether `value` matches `schema`; the error names the first path that does not.
pub fn validate(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let map = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{at}: no value is allowed")),
        Value::Object(map) => map,
        _ => return Ok(()),
    };
    if let Some(expected) = map.get("const") {
        if expected != value {
            return Err(format!("{at}: must be {expected}"));
        }
    }
    if let Some(values) = map.get("enum").and_then(Value::as_array) {
        if !values.contains(value) {
            return Err(format!(
                "{at}: must be one of {}",
                Value::Array(values.clone())
            ));
        }
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(options) = map.get(key).and_then(Value::as_array) {
            if !options.iter().any(|o| validate(o, value, at).is_ok()) {
                return Err(format!("{at}: matches none of `{key}`"));
            }
        }
    }
    if let Some(kind) = map.get("type") {
        let kinds: Vec<&str> = match kind {
            Value::String(k) => vec![k.as_str()],
            Value::Array(ks) => ks.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !kinds.iter().any(|k| is_type(value, k)) {
            return Err(format!("{at}: must be of type {}", kinds.join(" or ")));
        }
    }
    match value {
        Value::Object(object) => {
            if let Some(required) = map.get("required").and_then(Value::as_array) {
                for key in required.iter().filter_map(Value::as_str) {
                    if !object.contains_key(key) {
                        return Err(format!("{at}: missing required property `{key}`"));
                    }
                }
            }
            let properties = map.get("properties").and_then(Value::as_object);
            for (key, item) in object {
                match properties.and_then(|p| p.get(key)) {
                    Some(sub) => validate(sub, item, &format!("{at}.{key}"))?,
                    None if map.get("additionalProperties") == Some(&Value::Bool(false)) => {
                        return Err(format!("{at}: property `{key}` is not allowed"))
                    }
                    None => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = map.get("minItems").and_then(Value::as_u64) {
                if (items.len() as u64) < min {
                    return Err(format!("{at}: needs at least {min} items"));
                }
            }
            if let Some(max) = map.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    return Err(format!("{at}: allows at most {max} items"));
                }
            }
            if let Some(schema) = map.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(schema, item, &format!("{at}[{i}]"))?;
                }
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if map
                .get("minLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| len < m)
            {
                return Err(format!("{at}: is shorter than minLength"));
            }
            if map
                .get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| len > m)
            {
                return Err(format!("{at}: is longer than maxLength"));
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            let bound = |key: &str| map.get(key).and_then(Value::as_f64);
            if bound("minimum").is_some_and(|m| x < m)
                || bound("maximum").is_some_and(|m| x > m)
                || bound("exclusiveMinimum").is_some_and(|m| x <= m)
                || bound("exclusiveMaximum").is_some_and(|m| x >= m)
            {
                return Err(format!("{at}: {x} is out of range"));
            }
            if let Some(step) = bound("multipleOf").filter(|s| *s > 0.0) {
                if ((x / step) - (x / step).round()).abs() > 1e-9 {
                    return Err(format!("{at}: must be a multiple of {step}"));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn is_type(value: &Value, kind: &str) -> bool {
    match kind {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unsupported_constructs_are_named_with_their_place() {
        let schema =
            json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}});
        let err = GrammarBuilder::new()
            .schema(&schema, "parameters")
            .unwrap_err();
        assert_eq!(
            err,
            SchemaError::Unsupported {
                construct: "pattern".into(),
                at: "parameters.properties.a".into()
            }
        );
        let err = GrammarBuilder::new()
            .schema(&json!({"$ref": "#/defs/x"}), "schema")
            .unwrap_err();
        assert!(matches!(err, SchemaError::Unsupported { construct, .. } if construct == "$ref"));
    }

    fn compile(schema: Value) -> Result<String, SchemaError> {
        let mut g = GrammarBuilder::new();
        let root = g.schema(&schema, "schema")?;
        g.finish_checked(&root, "schema")
    }

    #[test]
    fn contradictory_and_huge_bounds_are_refused_with_their_place() {
        let err = compile(json!({"type": "object", "properties": {
            "xs": {"type": "array", "minItems": 5, "maxItems": 2}}}))
        .unwrap_err();
        assert!(
            matches!(&err, SchemaError::Unsatisfiable { at, .. } if at == "schema.properties.xs"),
            "{err}"
        );
        assert!(matches!(
            compile(json!({"type": "string", "minLength": 9, "maxLength": 3})),
            Err(SchemaError::Unsatisfiable { .. })
        ));
        assert!(matches!(
            compile(json!({"type": "array", "minItems": 1_000_000})),
            Err(SchemaError::TooLarge { .. })
        ));
        // A maximum over the grammar's bound is left to validation.
        let grammar =
            compile(json!({"type": "string", "minLength": 2, "maxLength": 1_000_000})).unwrap();
        assert!(grammar.contains("char{2,}"), "{grammar}");
        let mut deep = json!({"type": "string"});
        for _ in 0..40 {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(matches!(compile(deep), Err(SchemaError::TooLarge { .. })));
        let many: serde_json::Map<String, Value> = (0..3000)
            .map(|i| (format!("property_number_{i}"), json!({"type": "string"})))
            .collect();
        assert!(matches!(
            compile(json!({"type": "object", "properties": many})),
            Err(SchemaError::TooLarge { .. })
        ));
    }

    /// Seeded property test: random schemas built from the supported keywords with random bounds
    /// either compile to a grammar that passes the grammar check, or are refused; never a panic.
    #[test]
    fn generated_schemas_compile_or_are_refused() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        fn schema(rng: &mut StdRng, depth: u32) -> Value {
            let bound = |rng: &mut StdRng| -> Value {
                json!([0u64, 1, 3, 2000, 2001, 1 << 40][rng.gen_range(0..6)])
            };
            match rng.gen_range(0..if depth > 3 { 3 } else { 6 }) {
                0 => json!({"type": "string", "minLength": bound(rng), "maxLength": bound(rng)}),
                1 => json!({"type": ["integer", "null"]}),
                2 => json!({"enum": ["a", 1, null]}),
                3 => json!({"type": "array", "items": schema(rng, depth + 1),
                            "minItems": bound(rng), "maxItems": bound(rng)}),
                4 => {
                    let props: serde_json::Map<String, Value> = (0..rng.gen_range(0..4))
                        .map(|i| (format!("p{i}"), schema(rng, depth + 1)))
                        .collect();
                    json!({"type": "object", "properties": props, "required": ["p0"]})
                }
                _ => json!({"anyOf": [schema(rng, depth + 1), schema(rng, depth + 1)]}),
            }
        }
        let mut rng = StdRng::seed_from_u64(7);
        let mut compiled = 0;
        for _ in 0..400 {
            if compile(schema(&mut rng, 0)).is_ok() {
                compiled += 1;
            }
        }
        assert!(compiled > 50, "only {compiled} of 400 compiled");
    }

    #[test]
    fn an_object_schema_compiles_to_ordered_required_then_optional_properties() {
        let schema = json!({
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "a shell command"},
                "timeout_s": {"type": "number", "minimum": 0}
            },
            "required": ["command"]
        });
        let mut g = GrammarBuilder::new();
        let rule = g.schema(&schema, "shell").unwrap();
        let grammar = g.finish(&rule);
        assert!(grammar.starts_with("root ::= shell-"));
        assert!(grammar.contains(r#""\"command\"" ws ":" ws"#), "{grammar}");
        assert!(
            grammar.contains(r#"( ws "," ws "\"timeout_s\"" ws ":" ws"#),
            "{grammar}"
        );
    }

    #[test]
    fn literals_escape_json_text_for_gbnf() {
        assert_eq!(literal(&json!("a\"b")), r#""\"a\\\"b\"""#);
        assert_eq!(literal(&json!(3)), r#""3""#);
    }

    #[test]
    fn validation_names_the_first_bad_path() {
        let schema = json!({
            "type": "object",
            "properties": {
                "command": {"type": "string"},
                "timeout_s": {"type": "number", "minimum": 0},
                "mode": {"enum": ["a", "b"]},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}
            },
            "required": ["command"],
            "additionalProperties": false
        });
        assert!(validate(&schema, &json!({"command": "ls"}), "args").is_ok());
        let bad = [
            (json!({}), "missing required property `command`"),
            (
                json!({"command": 1}),
                "args.command: must be of type string",
            ),
            (json!({"command": "x", "timeout_s": -1}), "out of range"),
            (
                json!({"command": "x", "mode": "c"}),
                "args.mode: must be one of",
            ),
            (json!({"command": "x", "tags": ["a", 2]}), "args.tags[1]"),
            (
                json!({"command": "x", "tags": ["a", "b", "c"]}),
                "at most 2",
            ),
            (
                json!({"command": "x", "extra": 1}),
                "`extra` is not allowed",
            ),
        ];
        for (value, expected) in bad {
            let err = validate(&schema, &value, "args").unwrap_err();
            assert!(err.contains(expected), "{value}: {err}");
        }
        assert!(validate(&json!({"type": "integer"}), &json!(2.5), "x").is_err());
        assert!(validate(
            &json!({"anyOf": [{"type": "string"}, {"type": "null"}]}),
            &json!(null),
            "x"
        )
        .is_ok());
    }
}
