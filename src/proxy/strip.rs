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
}

/// Removes usage-only events from an SSE body, event by event. Feed it the body's data (not
/// its transfer framing) with [`push`](Self::push), then [`finish`](Self::finish).
#[derive(Default, Debug)]
pub struct UsageChunkStrip {
    /// The start of the event in progress (bytes not yet relayed).
    held: Vec<u8>,
    /// The state of the scan at the end of `held`.
    scan: Scan,
    /// The last event ended with a `\r` (an empty line ended by a lone `\r`, relayed or dropped
    /// at once so that it is not held for the next byte): a `\n` right after it is its own, and
    /// goes where it went (`Some(true)`: relayed).
    lf_after: Option<bool>,
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
            if let Some(kept) = self.lf_after.take() {
                if rest[0] == b'\n' {
                    if kept {
                        out.push(b'\n');
                    }
                    rest = &rest[1..];
                    continue;
                }
            }
            match self.event_end(rest) {
                Some((n, on_cr)) if self.oversized => {
                    // The rest of an oversized event, relayed as it comes, up to its end.
                    out.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    self.oversized = false;
                    self.lf_after = on_cr.then_some(true);
                }
                Some((n, on_cr)) => {
                    self.held.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    let kept = self.emit_held(out);
                    self.lf_after = on_cr.then_some(kept);
                }
                None if self.oversized => {
                    out.extend_from_slice(rest);
                    return;
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

    /// [`push`](Self::push), then [`finish`](Self::finish) when `end` (the body's last bytes).
    pub fn feed(&mut self, data: &[u8], end: bool, out: &mut Vec<u8>) {
        self.push(data, out);
        if end {
            self.finish(out);
        }
    }

    /// The body ended: whatever is held goes out (a last event without its blank line is
    /// inspected like any other).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.held.is_empty() {
            self.emit_held(out);
        }
    }

    /// The held bytes are one whole event: relayed (`true`), unless it is a usage-only one.
    fn emit_held(&mut self, out: &mut Vec<u8>) -> bool {
        let kept = !is_usage_only(&self.held);
        if kept {
            out.extend_from_slice(&self.held);
        } else {
            self.dropped += 1;
        }
        self.held.clear();
        kept
    }

    /// Scans `input` (the bytes after those held) for the end of the event in progress: how many
    /// of its bytes end it, and whether the last is a `\r` (a `\n` may still follow); `None`
    /// when it goes on.
    fn event_end(&mut self, input: &[u8]) -> Option<(usize, bool)> {
        for (i, &b) in input.iter().enumerate() {
            self.scan = match (self.scan, b) {
                // An empty line: the event ends.
                (Scan::LineStart, b'\n') => return Some((i + 1, false)),
                (Scan::LineStart, b'\r') | (Scan::AfterCr, b'\r') => {
                    self.scan = Scan::LineStart;
                    return Some((i + 1, true));
                }
                (Scan::AfterCr, b'\n') | (Scan::InLine, b'\n') => Scan::LineStart,
                (Scan::InLine, b'\r') => Scan::AfterCr,
                _ => Scan::InLine,
            };
        }
        None
    }
}

/// Whether `event` (one SSE event) is a usage-only chunk: its data — on one line, as the usage
/// scanner reads it — is a JSON object with `"choices": []` and a `usage` object.
fn is_usage_only(event: &[u8]) -> bool {
    // Cheap test first: content chunks (every one carries `"usage":null` when usage is asked
    // for) have choices.
    if !has_empty_choices(event) {
        return false;
    }
    let mut data_lines = event
        .split(|b| *b == b'\n' || *b == b'\r')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .map(|v| v.strip_prefix(b" ").unwrap_or(v));
    let (Some(data), None) = (data_lines.next(), data_lines.next()) else {
        return false;
    };
    match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(o)) => {
            o.get("choices").and_then(Value::as_array).is_some_and(|c| c.is_empty())
                && o.get("usage").is_some_and(Value::is_object)
        }
        _ => false,
    }
}

/// Whether `event` holds `"choices"`, a colon and an empty array (any JSON whitespace between).
fn has_empty_choices(event: &[u8]) -> bool {
    let blank = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    memchr::memmem::find_iter(event, b"\"choices\"").any(|at| {
        let mut rest = event[at + 9..].iter().skip_while(|b| blank(b));
        rest.next() == Some(&b':')
            && rest.by_ref().find(|b| !blank(b)) == Some(&b'[')
            && rest.find(|b| !blank(b)) == Some(&b']')
    })
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
    fn usage_data_over_several_lines_is_kept_as_the_usage_scanner_cannot_charge_it() {
        let split = "data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":1}}\n\n";
        let (out, dropped) = run(&[split.as_bytes(), DONE.as_bytes()]);
        assert_eq!(String::from_utf8(out).unwrap(), format!("{split}{DONE}"));
        assert_eq!(dropped, 0);
    }

    #[test]
    fn json_whitespace_does_not_hide_a_usage_chunk() {
        let spaced = "data: {\"id\": \"c\", \"choices\" : [ ], \"usage\"  : {\"prompt_tokens\": 3}}\n\n";
        let (out, dropped) = run(&[CONTENT.as_bytes(), spaced.as_bytes(), DONE.as_bytes()]);
        assert_eq!(String::from_utf8(out).unwrap(), format!("{CONTENT}{DONE}"));
        assert_eq!(dropped, 1);
    }

    #[test]
    fn an_event_ended_by_a_lone_cr_is_relayed_at_once() {
        let mut s = UsageChunkStrip::default();
        let mut out = Vec::new();
        s.push(b"data: {\"choices\":[{\"delta\":{}}]}\r\r", &mut out);
        assert_eq!(out, b"data: {\"choices\":[{\"delta\":{}}]}\r\r", "not held for the next byte");
        // A `\n` after it was its own (`\r\r\n`): it follows it out.
        s.push(b"\ndata: [DONE]\r\r", &mut out);
        assert_eq!(out, b"data: {\"choices\":[{\"delta\":{}}]}\r\r\ndata: [DONE]\r\r");
        // A dropped one takes its `\n` along.
        let mut s = UsageChunkStrip::default();
        let mut out = Vec::new();
        s.push(b"data: {\"choices\":[],\"usage\":{}}\r\r", &mut out);
        s.push(b"\ndata: [DONE]\n\n", &mut out);
        assert_eq!((out.as_slice(), s.dropped), (&b"data: [DONE]\n\n"[..], 1));
    }
}
