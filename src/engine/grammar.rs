//! GBNF grammars checked in Rust before llama.cpp sees them.
//!
//! llama.cpp's grammar code is not safe on hostile input: `x{5,2}` makes its parser generate
//! rules until memory runs out (`max - min` underflows), deeply nested groups recurse until the
//! stack overflows, and a grammar that can never be satisfied leads the sampler to accept a token
//! the grammar refused, which throws a C++ exception across the FFI (the process aborts). So every
//! grammar, whoever wrote it (a client's raw `grammar`, a compiled JSON schema, a forcing grammar),
//! goes through [`check`] first: the same syntax llama.cpp parses, with bounds on nesting,
//! repetitions and expanded size, every rule defined, no left recursion, and a language that is not
//! empty. What this cannot know statically (a grammar satisfiable in characters but not by this
//! vocabulary's tokens) is caught while sampling: a step where no token is admissible ends the
//! sequence (see `llama/`).
//!
//! Must not: call llama.cpp. It is pure, so it is unit-tested and fuzzed without a model.

use std::collections::{BTreeMap, BTreeSet};

/// llama.cpp's own bound on one repetition (`MAX_REPETITION_THRESHOLD`).
pub const MAX_REPETITION: u64 = 2000;
/// Groups nested deeper than this are refused (llama.cpp's parser recurses once per level).
pub const MAX_NESTING: usize = 64;
/// Grammar elements after llama.cpp expands repetitions; more is refused.
pub const MAX_ELEMENTS: u64 = 200_000;

/// Why a grammar is refused. Positions are byte offsets into the grammar text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("syntax error at byte {at}: {reason}")]
    Syntax { at: usize, reason: String },
    #[error("the grammar has no `root` rule")]
    NoRoot,
    #[error("rule `{0}` is used but never defined")]
    Undefined(String),
    #[error("rule `{0}` is left-recursive (it can reach itself without consuming a character)")]
    LeftRecursive(String),
    #[error(
        "a `*`, `+` or `{{m,}}` repeats something that can match the empty string (in rule \
         `{0}`); llama.cpp would loop forever on it"
    )]
    EmptyLoop(String),
    #[error("repetition at byte {at}: {reason}")]
    Repetition { at: usize, reason: String },
    #[error("groups nested deeper than {MAX_NESTING} levels at byte {at}")]
    TooDeep { at: usize },
    #[error(
        "the grammar expands to more than {MAX_ELEMENTS} elements (repetitions multiply); simplify it"
    )]
    TooLarge,
    #[error(
        "no text can match the grammar: `root` needs a character class or literal that matches \
         nothing (e.g. a negated class covering every character, or NUL), or rules that never end"
    )]
    Empty,
}

/// Facts about a grammar that passed [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrammarFacts {
    pub rules: usize,
    /// Elements after repetitions are expanded (llama.cpp's own measure of size).
    pub elements: u64,
}

#[derive(Debug, Clone)]
enum Atom {
    /// A literal: its characters in order.
    Literal(Vec<u32>),
    /// `[...]` / `[^...]`: inclusive ranges.
    Class {
        negated: bool,
        ranges: Vec<(u32, u32)>,
    },
    Any,
    Ref(String),
    Group(Vec<Vec<Item>>),
    /// `<...>` / `!<...>`: a token, matched by id, not by text.
    Token,
}

#[derive(Debug, Clone)]
struct Item {
    atom: Atom,
    min: u64,
    /// `None`: unbounded.
    max: Option<u64>,
}

type Alternatives = Vec<Vec<Item>>;

struct Parser<'a> {
    src: &'a [u8],
    text: &'a str,
    pos: usize,
    depth: usize,
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

impl<'a> Parser<'a> {
    fn peek(&self) -> u8 {
        self.src.get(self.pos).copied().unwrap_or(0)
    }

    fn peek_at(&self, n: usize) -> u8 {
        self.src.get(self.pos + n).copied().unwrap_or(0)
    }

    fn error(&self, reason: impl Into<String>) -> GrammarError {
        GrammarError::Syntax {
            at: self.pos,
            reason: reason.into(),
        }
    }

    fn space(&mut self, newline_ok: bool) {
        loop {
            match self.peek() {
                b' ' | b'\t' => self.pos += 1,
                b'\r' | b'\n' if newline_ok => self.pos += 1,
                b'#' => {
                    while !matches!(self.peek(), 0 | b'\r' | b'\n') {
                        self.pos += 1;
                    }
                }
                _ => return,
            }
        }
    }

    fn name(&mut self) -> Result<String, GrammarError> {
        let start = self.pos;
        while is_word(self.peek()) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("expecting a rule name"));
        }
        Ok(self.text[start..self.pos].to_owned())
    }

    fn int(&mut self) -> Result<u64, GrammarError> {
        let start = self.pos;
        while self.peek().is_ascii_digit() {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("expecting an integer"));
        }
        // Larger than any bound we accept; llama.cpp would throw on overflow.
        Ok(self.text[start..self.pos].parse().unwrap_or(u64::MAX))
    }

    fn hex(&mut self, digits: usize) -> Result<u32, GrammarError> {
        let end = self.pos + digits;
        let text = self.text.get(self.pos..end).unwrap_or("");
        if text.len() != digits || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(self.error(format!("expecting {digits} hex digits")));
        }
        self.pos = end;
        Ok(u32::from_str_radix(text, 16).expect("checked hex digits"))
    }

    /// One character of a literal or class, escapes as llama.cpp reads them.
    fn char(&mut self) -> Result<u32, GrammarError> {
        match self.peek() {
            0 => Err(self.error("unexpected end of input")),
            b'\\' => {
                let escape = self.peek_at(1);
                self.pos += 2;
                match escape {
                    b'x' => self.hex(2),
                    b'u' => self.hex(4),
                    b'U' => self.hex(8),
                    b't' => Ok(u32::from('\t')),
                    b'r' => Ok(u32::from('\r')),
                    b'n' => Ok(u32::from('\n')),
                    b'\\' | b'"' | b'[' | b']' | b'-' => Ok(u32::from(escape)),
                    _ => {
                        self.pos -= 2;
                        Err(self.error("unknown escape"))
                    }
                }
            }
            _ => {
                let c = self.text[self.pos..]
                    .chars()
                    .next()
                    .expect("not at the end");
                self.pos += c.len_utf8();
                Ok(u32::from(c))
            }
        }
    }

    fn alternatives(&mut self, nested: bool) -> Result<Alternatives, GrammarError> {
        let mut alternatives = vec![self.sequence(nested)?];
        while self.peek() == b'|' {
            self.pos += 1;
            self.space(true);
            alternatives.push(self.sequence(nested)?);
        }
        Ok(alternatives)
    }

    fn sequence(&mut self, nested: bool) -> Result<Vec<Item>, GrammarError> {
        let mut items: Vec<Item> = Vec::new();
        loop {
            let atom = match self.peek() {
                b'"' => {
                    self.pos += 1;
                    let mut chars = Vec::new();
                    while self.peek() != b'"' {
                        chars.push(self.char()?);
                    }
                    self.pos += 1;
                    Atom::Literal(chars)
                }
                b'[' => {
                    self.pos += 1;
                    let negated = self.peek() == b'^';
                    if negated {
                        self.pos += 1;
                    }
                    let mut ranges = Vec::new();
                    while self.peek() != b']' {
                        let low = self.char()?;
                        let mut high = low;
                        if self.peek() == b'-' && self.peek_at(1) != b']' {
                            self.pos += 1;
                            high = self.char()?;
                        }
                        ranges.push((low, high));
                    }
                    self.pos += 1;
                    Atom::Class { negated, ranges }
                }
                b'<' | b'!' => {
                    if self.peek() == b'!' {
                        self.pos += 1;
                    }
                    if self.peek() != b'<' {
                        return Err(self.error("expecting '<'"));
                    }
                    while !matches!(self.peek(), 0 | b'>') {
                        self.pos += 1;
                    }
                    if self.peek() != b'>' {
                        return Err(self.error("expecting '>'"));
                    }
                    self.pos += 1;
                    Atom::Token
                }
                b'(' => {
                    if self.depth >= MAX_NESTING {
                        return Err(GrammarError::TooDeep { at: self.pos });
                    }
                    self.pos += 1;
                    self.space(true);
                    self.depth += 1;
                    let inner = self.alternatives(true)?;
                    self.depth -= 1;
                    if self.peek() != b')' {
                        return Err(self.error("expecting ')'"));
                    }
                    self.pos += 1;
                    Atom::Group(inner)
                }
                b'.' => {
                    self.pos += 1;
                    Atom::Any
                }
                b'*' | b'+' | b'?' | b'{' => {
                    let at = self.pos;
                    let (min, max) = self.repetition()?;
                    let Some(last) = items.last_mut() else {
                        return Err(GrammarError::Syntax {
                            at,
                            reason: "expecting an item before */+/?/{".into(),
                        });
                    };
                    // A repeated repetition: llama.cpp expands the inner one first, then repeats
                    // that; for the bounds that matter here, the product is what it builds.
                    let (inner_min, inner_max) = (last.min, last.max);
                    if !(inner_min == 1 && inner_max == Some(1)) {
                        let group = Item {
                            atom: std::mem::replace(&mut last.atom, Atom::Any),
                            min: inner_min,
                            max: inner_max,
                        };
                        last.atom = Atom::Group(vec![vec![group]]);
                    }
                    last.min = min;
                    last.max = max;
                    check_repetition(at, min, max)?;
                    self.space(nested);
                    continue;
                }
                c if is_word(c) => Atom::Ref(self.name()?),
                _ => return Ok(items),
            };
            self.space(nested);
            items.push(Item {
                atom,
                min: 1,
                max: Some(1),
            });
        }
    }

    fn repetition(&mut self) -> Result<(u64, Option<u64>), GrammarError> {
        let c = self.peek();
        self.pos += 1;
        match c {
            b'*' => return Ok((0, None)),
            b'+' => return Ok((1, None)),
            b'?' => return Ok((0, Some(1))),
            _ => {}
        }
        self.space(false);
        let min = self.int()?;
        self.space(false);
        let max = match self.peek() {
            b'}' => Some(min),
            b',' => {
                self.pos += 1;
                self.space(false);
                let max = if self.peek().is_ascii_digit() {
                    Some(self.int()?)
                } else {
                    None
                };
                self.space(false);
                if self.peek() != b'}' {
                    return Err(self.error("expecting '}'"));
                }
                max
            }
            _ => return Err(self.error("expecting ',' or '}'")),
        };
        self.pos += 1;
        Ok((min, max))
    }

    fn grammar(mut self) -> Result<BTreeMap<String, Alternatives>, GrammarError> {
        let mut rules = BTreeMap::new();
        self.space(true);
        while self.pos < self.src.len() {
            let name = self.name()?;
            self.space(false);
            if !self.text[self.pos..].starts_with("::=") {
                return Err(self.error("expecting ::="));
            }
            self.pos += 3;
            self.space(true);
            let body = self.alternatives(false)?;
            match self.peek() {
                b'\r' | b'\n' | 0 => {}
                _ => return Err(self.error("expecting a newline or the end")),
            }
            self.space(true);
            // As in llama.cpp, a later definition replaces an earlier one.
            rules.insert(name, body);
        }
        Ok(rules)
    }
}

fn check_repetition(at: usize, min: u64, max: Option<u64>) -> Result<(), GrammarError> {
    let reason = if min > MAX_REPETITION {
        format!("at least {min} repetitions; at most {MAX_REPETITION} are allowed")
    } else if max.is_some_and(|max| max > MAX_REPETITION) {
        format!(
            "up to {} repetitions; at most {MAX_REPETITION} are allowed (use `*` or `{{m,}}` for no bound)",
            max.unwrap_or_default()
        )
    } else if max.is_some_and(|max| max < min) {
        format!(
            "{{{min},{}}}: the minimum is above the maximum",
            max.unwrap_or_default()
        )
    } else {
        return Ok(());
    };
    Err(GrammarError::Repetition { at, reason })
}

/// Checks a GBNF grammar (root rule `root`) as described in the module docs.
pub fn check(text: &str) -> Result<GrammarFacts, GrammarError> {
    let parser = Parser {
        src: text.as_bytes(),
        text,
        pos: 0,
        depth: 0,
    };
    let rules = parser.grammar()?;
    if !rules.contains_key("root") {
        return Err(GrammarError::NoRoot);
    }
    let mut elements = 0u64;
    for body in rules.values() {
        elements = elements.saturating_add(alternatives_size(body, &rules)?);
    }
    if elements > MAX_ELEMENTS {
        return Err(GrammarError::TooLarge);
    }
    check_left_recursion(&rules)?;
    check_empty_loops(&rules)?;
    if !productive(&rules).contains("root") {
        return Err(GrammarError::Empty);
    }
    Ok(GrammarFacts {
        rules: rules.len(),
        elements,
    })
}

/// Elements llama.cpp builds for `body`: each item's atom times its repetition count. Also checks
/// that every referenced rule exists.
fn alternatives_size(
    body: &Alternatives,
    rules: &BTreeMap<String, Alternatives>,
) -> Result<u64, GrammarError> {
    let mut total = 1u64;
    for alternative in body {
        for item in alternative {
            let atom = match &item.atom {
                Atom::Literal(chars) => chars.len() as u64,
                Atom::Class { ranges, .. } => 1 + 2 * ranges.len() as u64,
                Atom::Any | Atom::Token => 1,
                Atom::Ref(name) => {
                    if !rules.contains_key(name) {
                        return Err(GrammarError::Undefined(name.clone()));
                    }
                    1
                }
                // The group is a rule of its own, built once; each copy is one reference.
                Atom::Group(inner) => 1u64.saturating_add(alternatives_size(inner, rules)?),
            };
            let copies = item.max.unwrap_or(item.min + 1).max(1);
            total = total.saturating_add(atom.saturating_mul(copies).saturating_add(copies));
            if total > MAX_ELEMENTS {
                return Err(GrammarError::TooLarge);
            }
        }
    }
    Ok(total)
}

/// Whether an atom can match the empty string, given the nullable rules known so far.
fn atom_nullable(atom: &Atom, nullable: &BTreeSet<&str>) -> bool {
    match atom {
        Atom::Literal(chars) => chars.is_empty(),
        Atom::Class { .. } | Atom::Any | Atom::Token => false,
        Atom::Ref(name) => nullable.contains(name.as_str()),
        Atom::Group(inner) => inner.iter().any(|alt| sequence_nullable(alt, nullable)),
    }
}

fn sequence_nullable(items: &[Item], nullable: &BTreeSet<&str>) -> bool {
    items
        .iter()
        .all(|item| item.min == 0 || atom_nullable(&item.atom, nullable))
}

fn nullable_rules(rules: &BTreeMap<String, Alternatives>) -> BTreeSet<&str> {
    let mut nullable = BTreeSet::new();
    loop {
        let before = nullable.len();
        for (name, body) in rules {
            if !nullable.contains(name.as_str())
                && body.iter().any(|alt| sequence_nullable(alt, &nullable))
            {
                nullable.insert(name.as_str());
            }
        }
        if nullable.len() == before {
            return nullable;
        }
    }
}

/// The rules an item sequence can start with: every reference up to the first item that must
/// consume a character.
fn leading_refs<'r>(items: &'r [Item], nullable: &BTreeSet<&str>, out: &mut Vec<&'r str>) {
    for item in items {
        match &item.atom {
            Atom::Ref(name) => out.push(name),
            Atom::Group(inner) => {
                for alt in inner {
                    leading_refs(alt, nullable, out);
                }
            }
            _ => {}
        }
        if !(item.min == 0 || atom_nullable(&item.atom, nullable)) {
            return;
        }
    }
}

fn check_left_recursion(rules: &BTreeMap<String, Alternatives>) -> Result<(), GrammarError> {
    let nullable = nullable_rules(rules);
    let edges: BTreeMap<&str, Vec<&str>> = rules
        .iter()
        .map(|(name, body)| {
            let mut out = Vec::new();
            for alt in body {
                leading_refs(alt, &nullable, &mut out);
            }
            (name.as_str(), out)
        })
        .collect();
    // Iterative depth-first search for a cycle (0 unvisited, 1 on the path, 2 done).
    let mut mark: BTreeMap<&str, u8> = BTreeMap::new();
    for &start in edges.keys() {
        if mark.get(start).copied().unwrap_or(0) != 0 {
            continue;
        }
        let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
        mark.insert(start, 1);
        while let Some((node, next)) = stack.last_mut() {
            let targets = edges.get(*node).map_or(&[][..], Vec::as_slice);
            if let Some(&target) = targets.get(*next) {
                *next += 1;
                match mark.get(target).copied().unwrap_or(0) {
                    0 => {
                        mark.insert(target, 1);
                        stack.push((target, 0));
                    }
                    1 => return Err(GrammarError::LeftRecursive(target.to_owned())),
                    _ => {}
                }
            } else {
                mark.insert(node, 2);
                stack.pop();
            }
        }
    }
    Ok(())
}

/// Refuses an unbounded repetition of something nullable: llama.cpp rewrites `x*` as
/// `S ::= x S | ""`, and with `x` nullable its stack expansion recurses without end (the engine
/// thread would hang, holding every other request).
fn check_empty_loops(rules: &BTreeMap<String, Alternatives>) -> Result<(), GrammarError> {
    fn walk(items: &[Item], nullable: &BTreeSet<&str>) -> bool {
        items.iter().any(|item| {
            (item.max.is_none() && atom_nullable(&item.atom, nullable))
                || matches!(&item.atom, Atom::Group(inner) if inner.iter().any(|alt| walk(alt, nullable)))
        })
    }
    let nullable = nullable_rules(rules);
    for (name, body) in rules {
        if body.iter().any(|alt| walk(alt, &nullable)) {
            return Err(GrammarError::EmptyLoop(name.clone()));
        }
    }
    Ok(())
}

/// Whether a class admits some character a token can produce (NUL never is: llama.cpp ends
/// every decoded piece with it and refuses tokens that start with it).
fn class_admits_something(negated: bool, ranges: &[(u32, u32)]) -> bool {
    const MAX_CHAR: u32 = 0x10FFFF;
    let mut spans: Vec<(u32, u32)> = ranges
        .iter()
        .filter(|(low, high)| low <= high)
        .map(|&(low, high)| (low.max(1), high.min(MAX_CHAR)))
        .filter(|(low, high)| low <= high)
        .collect();
    if !negated {
        return !spans.is_empty();
    }
    spans.sort_unstable();
    let mut next = 1u32;
    for (low, high) in spans {
        if low > next {
            return true;
        }
        next = next.max(high.saturating_add(1));
    }
    next <= MAX_CHAR
}

fn atom_productive(atom: &Atom, productive: &BTreeSet<&str>) -> bool {
    match atom {
        Atom::Literal(chars) => chars.iter().all(|&c| c != 0),
        Atom::Class { negated, ranges } => class_admits_something(*negated, ranges),
        Atom::Any | Atom::Token => true,
        Atom::Ref(name) => productive.contains(name.as_str()),
        Atom::Group(inner) => inner
            .iter()
            .any(|alt| alt.iter().all(|item| item_productive(item, productive))),
    }
}

fn item_productive(item: &Item, productive: &BTreeSet<&str>) -> bool {
    item.min == 0 || atom_productive(&item.atom, productive)
}

/// The rules that match at least one finite string.
fn productive(rules: &BTreeMap<String, Alternatives>) -> BTreeSet<&str> {
    let mut productive = BTreeSet::new();
    loop {
        let before = productive.len();
        for (name, body) in rules {
            if !productive.contains(name.as_str())
                && body
                    .iter()
                    .any(|alt| alt.iter().all(|item| item_productive(item, &productive)))
            {
                productive.insert(name.as_str());
            }
        }
        if productive.len() == before {
            return productive;
        }
    }
}

#[cfg(test)]
mod tests;
