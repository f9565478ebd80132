//! The usage chunk a client did not ask for, taken out of an OpenAI stream.
//!
//! A streaming chat or completions request with `stream_options.include_usage: false` goes to the
//! gateway with `true` (the stream's usage is what the call is charged from: without it reasoning
//! tokens, which never show in the text, would go uncharged). The client then gets the stream it
//! asked for: the event that carries only the usage (`"choices": []` and a `usage` object) is
//! dropped on the way, every other byte is relayed as it came, event by event.
//!
//! Bytes of an event are held until its blank line arrives (a client cannot use half an event);
//! an event longer than [`MAX_HELD`] is relayed as it comes, unfiltered.
//!
//! Owns: `UsageChunkStrip`. Imports: serde_json. No I/O.

use serde_json::Value;

/// The most of one event held back while waiting for its end.
pub const MAX_HELD: usize = 1 << 20;

/// Where the scan of the held bytes stands (SSE lines end with `\r\n`, `\n` or `\r`; an event
/// ends with an empty line).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
enum Scan {
    /// At the start of a line (the start of an event, or just after a line end).
    #[default]
    LineStart,
    InLine,
    /// After the `\r` that ended a non-empty line (a `\n` may follow).
    AfterCr,
    /// After the `\r` that ended an empty line: the event has ended, and a `\n` may still
    /// belong to it.
    EmptyCr,
}

/// Removes usage-only events from an SSE body, event by event. Feed it the body's data (not
/// its transfer framing) with [`push`](Self::push), then [`finish`](Self::finish).
#[derive(Default, Debug)]
pub struct UsageChunkStrip {
    /// The start of the event in progress (bytes not yet relayed).
    held: Vec<u8>,
    /// The state of the scan at the end of `held`.
    scan: Scan,
    /// The event in progress grew past [`MAX_HELD`]: relayed as it comes, not inspected.
    oversized: bool,
    /// Events dropped so far.
    pub dropped: u32,
}

impl UsageChunkStrip {
    /// Takes the next body bytes; appends what the client gets to `out` (every complete event
    /// but a usage-only one).
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let mut rest = data;
        while !rest.is_empty() {
            if self.oversized {
                // Relay the oversized event's bytes as they come, up to its end.
                match self.event_end(rest) {
                    Some(n) => {
                        out.extend_from_slice(&rest[..n]);
                        rest = &rest[n..];
                        self.oversized = false;
                    }
                    None => {
                        out.extend_from_slice(rest);
                        return;
                    }
                }
                continue;
            }
            match self.event_end(rest) {
                Some(n) => {
                    self.held.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    self.emit_held(out);
                }
                None => {
                    self.held.extend_from_slice(rest);
                    if self.held.len() > MAX_HELD {
                        out.extend_from_slice(&self.held);
                        self.held.clear();
                        self.oversized = true;
                    }
                    return;
                }
            }
        }
    }

    /// The body ended: whatever is held goes out (a last event without its blank line is
    /// inspected like any other).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.held.is_empty() {
            self.emit_held(out);
        }
    }

    /// The held bytes are one whole event: relayed, unless it is a usage-only one.
    fn emit_held(&mut self, out: &mut Vec<u8>) {
        if is_usage_only(&self.held) {
            self.dropped += 1;
        } else {
            out.extend_from_slice(&self.held);
        }
        self.held.clear();
    }

    /// Scans `input` (the bytes after those held) for the end of the event in progress: the
    /// number of its bytes that end it, or `None` when it goes on. A `\r` ending an empty line
    /// at the very end of `input` waits for the next byte (a `\n` there is the event's too).
    fn event_end(&mut self, input: &[u8]) -> Option<usize> {
        for (i, &b) in input.iter().enumerate() {
            self.scan = match (self.scan, b) {
                (Scan::EmptyCr, b'\n') => {
                    self.scan = Scan::LineStart;
                    return Some(i + 1);
                }
                (Scan::EmptyCr, _) => {
                    // The event ended with that `\r`; this byte starts the next one.
                    self.scan = Scan::LineStart;
                    return Some(i);
                }
                (Scan::LineStart, b'\n') => return Some(i + 1),
                (Scan::LineStart, b'\r') => Scan::EmptyCr,
                (Scan::AfterCr, b'\n') | (Scan::InLine, b'\n') => Scan::LineStart,
                // `\r\r`: the second one ends an empty line.
                (Scan::AfterCr, b'\r') => Scan::EmptyCr,
                (Scan::InLine, b'\r') => Scan::AfterCr,
                _ => Scan::InLine,
            };
        }
        None
    }
}

/// Whether `event` (one SSE event) is a usage-only chunk: its data is a JSON object with
/// `"choices": []` and a `usage` object.
fn is_usage_only(event: &[u8]) -> bool {
    // Cheap test first: most events do not mention a usage object at all.
    if !event.windows(8).any(|w| w == b"\"usage\":") && !event.windows(9).any(|w| w == b"\"usage\" :") {
        return false;
    }
    let mut data = Vec::new();
    for line in event.split(|b| *b == b'\n' || *b == b'\r') {
        if let Some(v) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
        }
    }
    match serde_json::from_slice::<Value>(&data) {
        Ok(Value::Object(o)) => {
            o.get("choices").and_then(Value::as_array).is_some_and(|c| c.is_empty())
                && o.get("usage").is_some_and(Value::is_object)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT: &str =
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
    const USAGE: &str =
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn run(pieces: &[&[u8]]) -> (Vec<u8>, u32) {
        let mut s = UsageChunkStrip::default();
        let mut out = Vec::new();
        for p in pieces {
            s.push(p, &mut out);
        }
        s.finish(&mut out);
        (out, s.dropped)
    }

    #[test]
    fn the_usage_chunk_goes_and_every_other_byte_stays() {
        let body = format!("{CONTENT}{CONTENT}{USAGE}{DONE}");
        let (out, dropped) = run(&[body.as_bytes()]);
        assert_eq!(String::from_utf8(out).unwrap(), format!("{CONTENT}{CONTENT}{DONE}"));
        assert_eq!(dropped, 1);
    }

    #[test]
    fn any_split_of_the_body_gives_the_same_bytes() {
        for ends in ["\n\n", "\r\n\r\n", "\r\r", "\n\r\n", "\r\n\n"] {
            let body: String = [CONTENT, USAGE, DONE].iter().map(|e| e.replace("\n\n", ends)).collect();
            let want: String = [CONTENT, DONE].iter().map(|e| e.replace("\n\n", ends)).collect();
            let bytes = body.as_bytes();
            for cut in 0..=bytes.len() {
                for cut2 in (cut..=bytes.len()).step_by(5) {
                    let (out, dropped) = run(&[&bytes[..cut], &bytes[cut..cut2], &bytes[cut2..]]);
                    assert_eq!(String::from_utf8(out).unwrap(), want, "ends {ends:?}, cuts {cut}/{cut2}");
                    assert_eq!(dropped, 1);
                }
            }
        }
    }

    #[test]
    fn usage_on_a_chunk_with_choices_is_kept() {
        let with_choices =
            "data: {\"choices\":[{\"index\":0,\"delta\":{}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n";
        let null_usage = "data: {\"choices\":[],\"usage\":null}\n\n";
        let body = format!("{with_choices}{null_usage}: comment\n\nevent: x\ndata: not json\n\n{DONE}");
        let (out, dropped) = run(&[body.as_bytes()]);
        assert_eq!(String::from_utf8(out).unwrap(), body);
        assert_eq!(dropped, 0);
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_still_inspected() {
        let usage = USAGE.trim_end();
        let (out, dropped) = run(&[CONTENT.as_bytes(), usage.as_bytes()]);
        assert_eq!(String::from_utf8(out).unwrap(), CONTENT);
        assert_eq!(dropped, 1);
        let (out, _) = run(&[CONTENT.as_bytes(), b"data: {\"partial"]);
        assert_eq!(String::from_utf8(out).unwrap(), format!("{CONTENT}data: {{\"partial"));
    }

    #[test]
    fn an_oversized_event_is_relayed_whole_and_the_stream_is_still_filtered_after_it() {
        let big = format!("data: {{\"choices\":[],\"usage\":{{}},\"pad\":\"{}\"}}\n\n", "x".repeat(MAX_HELD + 100_000));
        let mut s = UsageChunkStrip::default();
        let mut out = Vec::new();
        for piece in big.as_bytes().chunks(64 * 1024) {
            s.push(piece, &mut out);
            assert!(s.held.len() <= MAX_HELD + 64 * 1024, "held {}", s.held.len());
        }
        s.push(USAGE.as_bytes(), &mut out);
        s.push(DONE.as_bytes(), &mut out);
        s.finish(&mut out);
        assert!(out == format!("{big}{DONE}").as_bytes(), "the big event and [DONE], {} bytes", out.len());
        assert_eq!(s.dropped, 1);
    }

    #[test]
    fn multi_line_data_is_joined_before_it_is_read() {
        let split = "data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":1}}\n\n";
        let (out, dropped) = run(&[split.as_bytes(), DONE.as_bytes()]);
        assert_eq!(String::from_utf8(out).unwrap(), DONE);
        assert_eq!(dropped, 1);
    }
}
