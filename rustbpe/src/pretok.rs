//! Pre-tokenizer: splits text into chunks exactly as the GPT-4 split regex does.
//!
//! STUB: splits on ASCII spaces only, until the hand-written scanner lands.

/// The split patterns we implement exactly; any other pattern is rejected by the Python wrapper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// GPT-4 (cl100k): numbers in runs of 1-3 digits.
    Gpt4,
    /// nanochat's variant: numbers in runs of 1-2 digits.
    Nanochat,
}

impl Pattern {
    pub const GPT4: &'static str = r#"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"#;
    pub const NANOCHAT: &'static str = r#"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"#;

    pub fn from_id(id: u32) -> Option<Pattern> {
        match id {
            0 => Some(Pattern::Gpt4),
            1 => Some(Pattern::Nanochat),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Gpt4 => Self::GPT4,
            Pattern::Nanochat => Self::NANOCHAT,
        }
    }
}

/// Iterator over the chunks of `text`; concatenated, they give back `text`.
pub struct Chunks<'a> {
    text: &'a str,
    pos: usize,
    #[allow(dead_code)]
    pattern: Pattern,
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.pos >= self.text.len() {
            return None;
        }
        let rest = &self.text[self.pos..];
        let end = rest[1..].find(' ').map(|i| i + 1).unwrap_or(rest.len());
        self.pos += end;
        Some(&rest[..end])
    }
}

pub fn split(text: &str, pattern: Pattern) -> Chunks<'_> {
    Chunks { text, pos: 0, pattern }
}
