//! A byte-level recogniser of one JSON object (RFC 8259), fed one byte at a
//! time: it accepts exactly the prefixes of `{...}` documents, optionally
//! surrounded by whitespace, and says when the object is complete.
//!
//! Runs of whitespace are capped ([`MAX_WHITESPACE_RUN`]) and nesting is capped
//! ([`MAX_DEPTH`]), so that a model cannot stall inside the constraint by
//! emitting blanks forever or open containers without end.

/// Longest run of whitespace bytes accepted between two tokens of the document.
pub const MAX_WHITESPACE_RUN: u8 = 16;
/// Deepest nesting of objects and arrays accepted.
pub const MAX_DEPTH: usize = 32;

/// An open container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Object,
    Array,
}

/// Where the recogniser stands between bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Before the document's opening `{`.
    Start,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    ObjectKey,
    /// After a key: `:`.
    Colon,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After `:` or `,` in an array: a value.
    Value,
    /// After a value: `,` or the closing bracket of the innermost container.
    AfterValue,
    /// Inside a string; `key` says whether it is an object key.
    InString { key: bool },
    /// After a backslash in a string.
    Escape { key: bool },
    /// Inside `\uXXXX`, with this many hex digits still to come.
    Unicode { key: bool, left: u8 },
    /// Inside a number, at `part`.
    Number(NumberPart),
    /// Inside `true`, `false` or `null`: the rest of the word to come.
    Literal { word: &'static [u8], at: u8 },
    /// The document's object has closed: only whitespace may follow.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberPart {
    /// After `-`: a digit.
    Sign,
    /// After a leading `0`: `.`, `e` or the end.
    Zero,
    /// In the integer digits.
    Integer,
    /// After `.`: a digit.
    Point,
    /// In the fraction digits.
    Fraction,
    /// After `e`: a sign or a digit.
    Exponent,
    /// After the exponent's sign: a digit.
    ExponentSign,
    /// In the exponent digits.
    ExponentDigits,
}

impl NumberPart {
    /// Whether a number may end here.
    fn complete(self) -> bool {
        matches!(
            self,
            NumberPart::Zero
                | NumberPart::Integer
                | NumberPart::Fraction
                | NumberPart::ExponentDigits
        )
    }
}

/// The recogniser's whole state: a scalar state, the open containers (`stack`
/// is shared with the caller so that trial runs can overlay it) and the current
/// whitespace run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonMachine {
    state: State,
    stack: Vec<Container>,
    blanks: u8,
}

impl Default for JsonMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonMachine {
    pub fn new() -> Self {
        Self {
            state: State::Start,
            stack: Vec::new(),
            blanks: 0,
        }
    }

    /// Whether the machine is inside a string, past any escape: then any bytes
    /// without a quote, a backslash or a control character keep it there.
    pub fn in_plain_string(&self) -> bool {
        matches!(self.state, State::InString { .. })
    }

    /// Whether the document's object is complete (the output may end here).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds `bytes`; returns false (and leaves the machine unspecified) at the
    /// first byte no JSON object document could continue with.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut cursor = Cursor {
            state: self.state,
            blanks: self.blanks,
            base: &self.stack,
            base_len: self.stack.len(),
            pushed: Vec::new(),
        };
        for &b in bytes {
            if !cursor.step(b) {
                return false;
            }
        }
        let (state, blanks, base_len, pushed) =
            (cursor.state, cursor.blanks, cursor.base_len, cursor.pushed);
        self.stack.truncate(base_len);
        self.stack.extend(pushed);
        self.state = state;
        self.blanks = blanks;
        true
    }

    /// Whether `bytes` could be fed now, without changing the machine.
    /// `scratch` is reused between calls to avoid allocating.
    pub fn accepts(&self, bytes: &[u8], scratch: &mut Vec<Container>) -> bool {
        scratch.clear();
        let mut cursor = Cursor {
            state: self.state,
            blanks: self.blanks,
            base: &self.stack,
            base_len: self.stack.len(),
            pushed: std::mem::take(scratch),
        };
        let ok = bytes.iter().all(|&b| cursor.step(b));
        *scratch = cursor.pushed;
        ok
    }
}

/// A trial run over the machine's state: pops come off `pushed` first, then
/// shorten the view of the machine's own stack.
struct Cursor<'a> {
    state: State,
    blanks: u8,
    base: &'a [Container],
    base_len: usize,
    pushed: Vec<Container>,
}

impl Cursor<'_> {
    fn depth(&self) -> usize {
        self.base_len + self.pushed.len()
    }

    fn top(&self) -> Option<Container> {
        self.pushed
            .last()
            .copied()
            .or_else(|| self.base_len.checked_sub(1).map(|i| self.base[i]))
    }

    fn push(&mut self, c: Container) -> bool {
        if self.depth() >= MAX_DEPTH {
            return false;
        }
        self.pushed.push(c);
        true
    }

    fn pop(&mut self) {
        if self.pushed.pop().is_none() {
            self.base_len = self.base_len.saturating_sub(1);
        }
    }

    /// The state after a value ends: inside a container, or the end of the document.
    fn after_value(&self) -> State {
        if self.depth() == 0 {
            State::Done
        } else {
            State::AfterValue
        }
    }

    /// Closes the innermost container with `b` (`}` or `]`) if it matches.
    fn close(&mut self, b: u8) -> bool {
        let want = match b {
            b'}' => Container::Object,
            b']' => Container::Array,
            _ => return false,
        };
        if self.top() != Some(want) {
            return false;
        }
        self.pop();
        self.state = self.after_value();
        true
    }

    /// Starts a value with `b`.
    fn value(&mut self, b: u8) -> bool {
        self.state = match b {
            b'{' => {
                if !self.push(Container::Object) {
                    return false;
                }
                State::ObjectFirst
            }
            b'[' => {
                if !self.push(Container::Array) {
                    return false;
                }
                State::ArrayFirst
            }
            b'"' => State::InString { key: false },
            b'-' => State::Number(NumberPart::Sign),
            b'0' => State::Number(NumberPart::Zero),
            b'1'..=b'9' => State::Number(NumberPart::Integer),
            b't' => State::Literal {
                word: b"true",
                at: 1,
            },
            b'f' => State::Literal {
                word: b"false",
                at: 1,
            },
            b'n' => State::Literal {
                word: b"null",
                at: 1,
            },
            _ => return false,
        };
        true
    }

    /// A byte after a value inside a container: `,`, a closing bracket.
    fn after(&mut self, b: u8) -> bool {
        match b {
            b',' => {
                self.state = match self.top() {
                    Some(Container::Object) => State::ObjectKey,
                    Some(Container::Array) => State::Value,
                    None => return false,
                };
                true
            }
            b'}' | b']' => self.close(b),
            _ => false,
        }
    }

    fn step(&mut self, b: u8) -> bool {
        let blank = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        let between_tokens = matches!(
            self.state,
            State::Start
                | State::ObjectFirst
                | State::ObjectKey
                | State::Colon
                | State::ArrayFirst
                | State::Value
                | State::AfterValue
                | State::Done
        );
        if blank && between_tokens {
            if self.blanks >= MAX_WHITESPACE_RUN {
                return false;
            }
            self.blanks += 1;
            return true;
        }
        if !blank {
            self.blanks = 0;
        }
        match self.state {
            State::Start => {
                if b != b'{' {
                    return false;
                }
                self.value(b)
            }
            State::ObjectFirst => match b {
                b'"' => {
                    self.state = State::InString { key: true };
                    true
                }
                b'}' => self.close(b),
                _ => false,
            },
            State::ObjectKey => {
                if b != b'"' {
                    return false;
                }
                self.state = State::InString { key: true };
                true
            }
            State::Colon => {
                if b != b':' {
                    return false;
                }
                self.state = State::Value;
                true
            }
            State::ArrayFirst => {
                if b == b']' {
                    return self.close(b);
                }
                self.value(b)
            }
            State::Value => self.value(b),
            State::AfterValue => self.after(b),
            State::InString { key } => {
                match b {
                    b'"' => {
                        self.state = if key {
                            State::Colon
                        } else {
                            self.after_value()
                        };
                    }
                    b'\\' => self.state = State::Escape { key },
                    0x00..=0x1f => return false,
                    _ => {}
                }
                true
            }
            State::Escape { key } => {
                self.state = match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                        State::InString { key }
                    }
                    b'u' => State::Unicode { key, left: 4 },
                    _ => return false,
                };
                true
            }
            State::Unicode { key, left } => {
                if !b.is_ascii_hexdigit() {
                    return false;
                }
                self.state = if left > 1 {
                    State::Unicode {
                        key,
                        left: left - 1,
                    }
                } else {
                    State::InString { key }
                };
                true
            }
            State::Number(part) => self.number(part, b),
            State::Literal { word, at } => {
                if word.get(at as usize) != Some(&b) {
                    return false;
                }
                self.state = if at as usize + 1 == word.len() {
                    self.after_value()
                } else {
                    State::Literal { word, at: at + 1 }
                };
                true
            }
            State::Done => false,
        }
    }

    fn number(&mut self, part: NumberPart, b: u8) -> bool {
        use NumberPart::*;
        let next = match (part, b) {
            (Sign, b'0') => Zero,
            (Sign, b'1'..=b'9') => Integer,
            (Integer, b'0'..=b'9') => Integer,
            (Zero | Integer, b'.') => Point,
            (Point | Fraction, b'0'..=b'9') => Fraction,
            (Zero | Integer | Fraction, b'e' | b'E') => Exponent,
            (Exponent, b'+' | b'-') => ExponentSign,
            (Exponent | ExponentSign | ExponentDigits, b'0'..=b'9') => ExponentDigits,
            _ => {
                // The number ends here; `b` must follow a value (numbers only occur
                // inside containers: the document is an object).
                if !part.complete() {
                    return false;
                }
                if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                    self.state = State::AfterValue;
                    self.blanks = 1;
                    return true;
                }
                self.state = State::AfterValue;
                return self.after(b);
            }
        };
        self.state = State::Number(next);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(text: &str) -> bool {
        let mut m = JsonMachine::new();
        m.feed(text.as_bytes()) && m.is_done()
    }

    fn prefix_ok(text: &str) -> bool {
        JsonMachine::new().feed(text.as_bytes())
    }

    #[test]
    fn accepts_json_objects() {
        for doc in [
            "{}",
            " {\"a\": 1}",
            "{\"a\":[1,-2.5e+3,0,0.25,true,false,null,\"x\"],\"b\":{\"c\":{}}}",
            "{\"s\": \"quote \\\" backslash \\\\ unicode \\u00e9 é\"}",
            "{\"n\": -0, \"m\": 10E5, \"k\": [ ] , \"e\": [[]]}\n",
        ] {
            assert!(complete(doc), "{doc}");
            // Agrees with a real JSON parser.
            let parsed: serde_json::Value = serde_json::from_str(doc).unwrap();
            assert!(parsed.is_object());
        }
    }

    #[test]
    fn refuses_what_is_not_one_json_object() {
        for bad in [
            "[1]",
            "1",
            "\"x\"",
            "{'a': 1}",
            "{a: 1}",
            "{\"a\" 1}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":tru }",
            "{\"a\":1,}",
            "{,}",
            "{\"a\":1]",
            "{\"a\":[1}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12G4\"}",
            "{\"a\":\"line\nbreak\"}",
            "{} {}",
            "{}x",
            "{\"a\":+1}",
            "{\"a\":.5}",
        ] {
            assert!(!complete(bad), "{bad:?} should not be a complete object");
            let parsed = serde_json::from_str::<serde_json::Value>(bad);
            assert!(
                parsed.map(|v| !v.is_object()).unwrap_or(true),
                "the test case {bad:?} is a JSON object"
            );
        }
        // Prefixes are fine until the first wrong byte.
        assert!(prefix_ok("{\"a\": [1, {\"b\": tr"));
        assert!(!complete("{\"a\": [1, {\"b\": tr"));
        assert!(!prefix_ok("{\"a\": [1, {\"b\": tx"));
    }

    #[test]
    fn byte_by_byte_equals_all_at_once_and_trials_change_nothing() {
        let doc = "{\"key\": [1, 2.5, {\"x\": null}], \"t\": \"\\u0041\"}";
        let mut whole = JsonMachine::new();
        assert!(whole.feed(doc.as_bytes()));
        let mut stepwise = JsonMachine::new();
        let mut scratch = Vec::new();
        for (i, b) in doc.bytes().enumerate() {
            let before = stepwise.clone();
            assert!(stepwise.accepts(&[b], &mut scratch), "byte {i}");
            assert!(!stepwise.accepts(b"\x01", &mut scratch));
            assert_eq!(stepwise, before, "a trial leaves the machine as it was");
            assert!(stepwise.feed(&[b]));
        }
        assert_eq!(stepwise, whole);
        assert!(whole.is_done());
    }

    #[test]
    fn trials_pop_through_the_machines_own_stack() {
        let mut m = JsonMachine::new();
        assert!(m.feed(b"{\"a\": [[1"));
        let mut scratch = Vec::new();
        assert!(m.accepts(b"]]}", &mut scratch));
        assert!(!m.accepts(b"]}}", &mut scratch));
        assert!(m.accepts(b"], [{\"b\": 2}]", &mut scratch));
        assert!(!m.accepts(b"]]}}", &mut scratch), "nothing left to close");
        assert!(m.feed(b"]]}"));
        assert!(m.is_done());
    }

    #[test]
    fn whitespace_runs_and_nesting_are_capped() {
        let mut m = JsonMachine::new();
        assert!(m.feed(b"{"));
        let mut scratch = Vec::new();
        let run = vec![b' '; MAX_WHITESPACE_RUN as usize];
        assert!(m.accepts(&run, &mut scratch));
        let longer = vec![b'\n'; MAX_WHITESPACE_RUN as usize + 1];
        assert!(!m.accepts(&longer, &mut scratch));
        // Whitespace inside strings is content, not capped.
        let spaces = format!("\"{}\"", " ".repeat(100));
        assert!(m.accepts(spaces.as_bytes(), &mut scratch));

        let deep = format!("{{\"a\":{}", "[".repeat(MAX_DEPTH - 1));
        let mut m = JsonMachine::new();
        assert!(m.feed(deep.as_bytes()));
        assert!(!m.accepts(b"[", &mut scratch));
        assert!(m.accepts(b"1", &mut scratch));
    }
}
