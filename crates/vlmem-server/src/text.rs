//! Generated ids to text as it comes: deltas that never split a character, and stop strings
//! found and cut.
//!
//! Each new id is decoded with the few ids before it (a window that starts where the last
//! emitted text ended, as vLLM's incremental detokenizer does), so a step costs the same at
//! the thousandth token as at the first; text is held back while it ends in an incomplete
//! character (the tokenizer's U+FFFD) or in what may be the start of a stop string. At the
//! end the whole reply is decoded once more and whatever the windows missed is added, so the
//! deltas of a stream always add up to the whole reply's text.

/// The text of one reply, built as its ids arrive.
#[derive(Debug)]
pub struct TextStream {
    stops: Vec<String>,
    /// The longest stop string, bytes.
    longest_stop: usize,
    /// The reply's text so far (a matched stop string and what follows are cut).
    text: String,
    /// Bytes of `text` handed out as deltas.
    sent: usize,
    /// Ids before `read_offset` whose text is in `text`; the window starts at `prefix_offset`.
    prefix_offset: usize,
    read_offset: usize,
    stopped: bool,
}

/// What one step adds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Text to hand out now (may be empty).
    pub delta: String,
    /// A stop string was found: the reply ends here (its text is cut before the string).
    pub stopped: bool,
}

impl TextStream {
    /// A reply that ends at the first of `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        TextStream {
            longest_stop: stops.iter().map(String::len).max().unwrap_or(0),
            stops,
            text: String::new(),
            sent: 0,
            prefix_offset: 0,
            read_offset: 0,
            stopped: false,
        }
    }

    /// The text handed out so far.
    pub fn sent_text(&self) -> &str {
        &self.text[..self.sent]
    }

    /// Whether a stop string ended the reply.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// `ids` are the reply's ids so far (one more than at the last call); `decode` turns ids
    /// into text (special tokens dropped).
    pub fn push<E>(
        &mut self,
        ids: &[u32],
        decode: &mut impl FnMut(&[u32]) -> Result<String, E>,
    ) -> Result<Step, E> {
        if self.stopped {
            return Ok(Step {
                delta: String::new(),
                stopped: true,
            });
        }
        let prefix = decode(&ids[self.prefix_offset..self.read_offset])?;
        let window = decode(&ids[self.prefix_offset..])?;
        if window.len() > prefix.len()
            && !window.ends_with('\u{FFFD}')
            && let Some(new) = window.strip_prefix(prefix.as_str())
        {
            self.text.push_str(new);
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
        }
        Ok(self.release(false))
    }

    /// The reply has ended: `full` is all its ids decoded at once. Returns the last delta.
    pub fn finish(&mut self, full: &str) -> Step {
        if !self.stopped
            && let Some(rest) = full.strip_prefix(self.text.as_str())
        {
            self.text.push_str(rest);
        }
        self.release(true)
    }

    /// Looks for a stop string in the text not yet handed out, and hands out what is safe:
    /// everything up to a match, or (unless `last`) all but a tail that may begin one.
    fn release(&mut self, last: bool) -> Step {
        if self.stopped {
            return Step {
                delta: String::new(),
                stopped: true,
            };
        }
        // No stop string can begin in the text already handed out (the tail that might
        // was held back), so the search starts there.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[self.sent..].find(s.as_str()))
            .min();
        if let Some(at) = found {
            self.text.truncate(self.sent + at);
            self.stopped = true;
        }
        let end = if self.stopped || last {
            self.text.len()
        } else {
            self.text.len() - self.held_tail()
        };
        let delta = self.text[self.sent..end].to_string();
        self.sent = end;
        Step {
            delta,
            stopped: self.stopped,
        }
    }

    /// Bytes at the end of the unsent text that are the beginning of some stop string.
    fn held_tail(&self) -> usize {
        let unsent = &self.text[self.sent..];
        let most = unsent.len().min(self.longest_stop.saturating_sub(1));
        (1..=most)
            .rev()
            .find(|&k| {
                self.stops.iter().any(|s| {
                    s.len() > k
                        && s.is_char_boundary(k)
                        && unsent.is_char_boundary(unsent.len() - k)
                        && unsent.ends_with(&s[..k])
                })
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level "tokenizer": each id is one byte; invalid UTF-8 decodes lossily.
    fn decode(ids: &[u32]) -> Result<String, ()> {
        let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn run(text: &str, stops: &[&str]) -> (Vec<String>, String, bool) {
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut deltas = Vec::new();
        for n in 1..=ids.len() {
            let step = s.push(&ids[..n], &mut decode).unwrap();
            deltas.push(step.delta);
            if step.stopped {
                break;
            }
        }
        let stopped = s.stopped();
        let end = ids.len();
        let last = s.finish(&decode(&ids[..end]).unwrap());
        deltas.push(last.delta);
        (deltas, s.sent_text().to_string(), stopped)
    }

    #[test]
    fn deltas_never_split_a_character_and_add_up_to_the_text() {
        let text = "héllo wörld ✓ 日本語 🙂!";
        let (deltas, all, stopped) = run(text, &[]);
        assert!(!stopped);
        assert_eq!(deltas.concat(), text);
        assert_eq!(all, text);
        // Every delta is whole characters (a &str is valid UTF-8 by construction; no
        // replacement character ever leaks out).
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
        // Multi-byte characters arrive whole: some steps hand out nothing.
        assert!(deltas.iter().any(String::is_empty));
    }

    #[test]
    fn a_stop_string_cuts_the_text_and_ends_the_reply() {
        let (deltas, all, stopped) = run("one two three four", &["thr", "zzz"]);
        assert!(stopped);
        assert_eq!(all, "one two ");
        assert_eq!(deltas.concat(), "one two ");
        // The earliest match wins, whichever stop string it is.
        let (_, all, _) = run("abcabc", &["c", "b"]);
        assert_eq!(all, "a");
    }

    #[test]
    fn a_possible_start_of_a_stop_string_is_held_back_then_released() {
        let ids: Vec<u32> = "ab<en".bytes().map(u32::from).collect();
        let mut s = TextStream::new(vec!["<end>".into()]);
        let mut out = String::new();
        for n in 1..=ids.len() {
            out.push_str(&s.push(&ids[..n], &mut decode).unwrap().delta);
        }
        assert_eq!(out, "ab", "'<en' may begin '<end>': held back");
        // The reply ended without the stop string: the held text comes out.
        out.push_str(&s.finish("ab<en").delta);
        assert_eq!(out, "ab<en");
    }

    #[test]
    fn stop_strings_spanning_many_ids_and_multibyte_stops() {
        let (_, all, stopped) = run("héllo wörld", &["wö"]);
        assert!(stopped);
        assert_eq!(all, "héllo ");
        let (_, all, stopped) = run("abc", &[""]);
        assert!(!stopped, "an empty stop string never matches");
        assert_eq!(all, "abc");
    }

    #[test]
    fn the_whole_decode_is_added_at_the_end() {
        // A decoder whose text of a window is not the text of the whole (as a tokenizer
        // that strips a leading space): finish() adds what the windows missed.
        let mut s = TextStream::new(vec![]);
        let mut odd = |ids: &[u32]| -> Result<String, ()> {
            Ok(ids.iter().map(|i| format!("<{i}>")).collect())
        };
        let mut out = String::new();
        for n in 1..=3 {
            out.push_str(&s.push(&[1, 2, 3][..n], &mut odd).unwrap().delta);
        }
        out.push_str(&s.finish("<1><2><3>!").delta);
        assert_eq!(out, "<1><2><3>!");
    }
}
