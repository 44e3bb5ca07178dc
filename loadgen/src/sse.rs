//! An incremental parser for `text/event-stream` bodies.
//!
//! Bytes arrive in arbitrary chunks; lines and events may be split anywhere,
//! including inside a multi-byte UTF-8 character or between `\r` and `\n`.
//! Follows the WHATWG rules that matter for LLM streams: lines end in `\n`,
//! `\r\n` or `\r`; a blank line dispatches the event; `data:` lines are joined
//! with `\n`; `event:` names the event; lines starting with `:` are comments;
//! other fields are ignored; an event without data is not dispatched, and an
//! unterminated event at end of stream is discarded.

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, when the server named the event.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Feed it bytes as they come; it returns the events completed so far.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    skip_next_lf: bool,
    data: Option<String>,
    event: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes one chunk of the body and returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &byte in chunk {
            if self.skip_next_lf {
                self.skip_next_lf = false;
                if byte == b'\n' {
                    continue;
                }
            }
            match byte {
                b'\n' => self.end_line(&mut events),
                b'\r' => {
                    self.skip_next_lf = true;
                    self.end_line(&mut events);
                }
                _ => self.line.push(byte),
            }
        }
        events
    }

    fn end_line(&mut self, events: &mut Vec<SseEvent>) {
        let raw = std::mem::take(&mut self.line);
        let line = String::from_utf8_lossy(&raw);
        let line = line.strip_prefix('\u{feff}').unwrap_or(&line);
        if line.is_empty() {
            let event = self.event.take();
            if let Some(data) = self.data.take() {
                events.push(SseEvent { event, data });
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => self.event = Some(value.to_owned()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_of(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn parses_whole_events() {
        let mut parser = SseParser::new();
        let events = parser.feed(b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n");
        assert_eq!(data_of(&events), ["{\"a\":1}", "{\"a\":2}", "[DONE]"]);
    }

    #[test]
    fn survives_every_split_point() {
        let body = "data: first\r\n\r\n: keep-alive\n\nevent: error\ndata: {\"error\":\"é\"}\n\ndata:no-space\r\rdata: [DONE]\n\n";
        let expected = vec![
            SseEvent {
                event: None,
                data: "first".into(),
            },
            SseEvent {
                event: Some("error".into()),
                data: "{\"error\":\"é\"}".into(),
            },
            SseEvent {
                event: None,
                data: "no-space".into(),
            },
            SseEvent {
                event: None,
                data: "[DONE]".into(),
            },
        ];
        let bytes = body.as_bytes();
        for split in 0..=bytes.len() {
            let mut parser = SseParser::new();
            let mut events = parser.feed(&bytes[..split]);
            events.extend(parser.feed(&bytes[split..]));
            assert_eq!(events, expected, "split at {split}");
        }
        // One byte at a time.
        let mut parser = SseParser::new();
        let events: Vec<SseEvent> = bytes.iter().flat_map(|b| parser.feed(&[*b])).collect();
        assert_eq!(events, expected);
    }

    #[test]
    fn joins_multi_line_data() {
        let mut parser = SseParser::new();
        let events = parser.feed(b"data: line one\ndata: line two\ndata\n\n");
        assert_eq!(data_of(&events), ["line one\nline two\n"]);
    }

    #[test]
    fn ignores_comments_other_fields_and_empty_events() {
        let mut parser = SseParser::new();
        let events = parser.feed(b": comment\nid: 7\nretry: 100\n\nevent: ping\n\ndata: x\n\n");
        assert_eq!(
            events,
            [SseEvent {
                event: None,
                data: "x".into()
            }]
        );
    }

    #[test]
    fn keeps_unterminated_event_pending() {
        let mut parser = SseParser::new();
        assert!(parser.feed(b"data: partial").is_empty());
        assert!(parser.feed(b"\n").is_empty());
        assert_eq!(data_of(&parser.feed(b"\n")), ["partial"]);
    }
}
