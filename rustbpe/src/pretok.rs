//! Pre-tokenizer: splits text into chunks exactly as the GPT-4 split regex does.
//!
//! A hand-written scanner replaces the regex engine: at each position it tries the pattern's
//! alternatives in order, as `regex.findall` does, each reduced to a forward scan over runs of one
//! character class (see `unicode_tables`). Some alternative always matches at least one character
//! (every character is a letter, a number, a space or "other", and each class starts a branch),
//! so the chunks cover the text with no gap.
//!
//! `Pattern::Whole` makes each text one chunk: the Python wrapper splits with any other pattern
//! itself (with the `regex` package) and hands over the chunks as texts.

use crate::unicode_tables::{class, Class, ASCII, ASCII_CASE_FOLDS};

/// The split patterns we implement exactly (ids 0 and 1), and "no split" (id 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// GPT-4 (cl100k): numbers in runs of 1-3 digits.
    Gpt4,
    /// nanochat's variant: numbers in runs of 1-2 digits.
    Nanochat,
    /// The whole text is one chunk (none if it is empty), for text the caller has split already.
    Whole,
}

impl Pattern {
    pub const GPT4: &'static str = r#"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"#;
    pub const NANOCHAT: &'static str = r#"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"#;
    pub const WHOLE: &'static str = r#"(?s).+"#;

    pub fn from_id(id: u32) -> Option<Pattern> {
        match id {
            0 => Some(Pattern::Gpt4),
            1 => Some(Pattern::Nanochat),
            2 => Some(Pattern::Whole),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Gpt4 => Self::GPT4,
            Pattern::Nanochat => Self::NANOCHAT,
            Pattern::Whole => Self::WHOLE,
        }
    }

    /// The `m` of `\p{N}{1,m}`, the only difference between the scanned patterns (None: no scan).
    fn max_numbers(self) -> Option<usize> {
        match self {
            Pattern::Gpt4 => Some(3),
            Pattern::Nanochat => Some(2),
            Pattern::Whole => None,
        }
    }
}

/// Iterator over the chunks of `text`; concatenated, they give back `text`.
pub struct Chunks<'a> {
    text: &'a str,
    pos: usize,
    max_numbers: Option<usize>,
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        if self.pos >= self.text.len() {
            return None;
        }
        let start = self.pos;
        self.pos = match self.max_numbers {
            Some(max_numbers) => chunk_end(self.text.as_bytes(), start, max_numbers),
            None => self.text.len(),
        };
        Some(&self.text[start..self.pos])
    }
}

pub fn split(text: &str, pattern: Pattern) -> Chunks<'_> {
    Chunks { text, pos: 0, max_numbers: pattern.max_numbers() }
}

/// The end of the match starting at `pos` (< s.len()), trying the alternatives in the pattern's order.
#[inline]
fn chunk_end(s: &[u8], pos: usize, max_numbers: usize) -> usize {
    let (first, next) = peek(s, pos).expect("chunk_end is called inside the text");
    // '(?i:[sdmt]|ll|ve|re)
    if s[pos] == b'\'' {
        if let Some(end) = contraction(s, next) {
            return end;
        }
    }
    match first {
        // [^\r\n\p{L}\p{N}]?+\p{L}+ without its prefix
        Class::Letter => return run(s, next, Class::Letter),
        // \p{N}{1,m}: nothing earlier can match at a number
        Class::Number => return numbers(s, next, max_numbers - 1),
        _ => {}
    }
    // [^\r\n\p{L}\p{N}]?+\p{L}+ with its prefix: a space or "other" character glued to a word
    let newline = s[pos] == b'\r' || s[pos] == b'\n';
    if !newline && class_at(s, next) == Some(Class::Letter) {
        return run(s, next, Class::Letter);
    }
    // ` ?[^\s\p{L}\p{N}]++[\r\n]*`; the `++` changes nothing as `[\r\n]*` may be empty
    if first == Class::Other {
        return newlines(s, run(s, next, Class::Other));
    }
    if s[pos] == b' ' && class_at(s, next) == Some(Class::Other) {
        return newlines(s, run(s, next, Class::Other));
    }
    whitespace(s, pos)
}

/// `\s*[\r\n]|\s+(?!\S)|\s+` at a space character.
fn whitespace(s: &[u8], pos: usize) -> usize {
    let (mut end, mut last_start, mut after_newline) = (pos, pos, None);
    while let Some((Class::Space, next)) = peek(s, end) {
        if s[end] == b'\r' || s[end] == b'\n' {
            after_newline = Some(next);
        }
        last_start = end;
        end = next;
    }
    match after_newline {
        // `\s*` backtracks to the last newline of the run
        Some(after) => after,
        // `\s+(?!\S)` backtracks one character to leave the last space to the next chunk (which
        // then glues it to a word or punctuation), unless the run ends the text or has one space
        None if end < s.len() && last_start > pos => last_start,
        None => end,
    }
}

/// `'(?i:[sdmt]|ll|ve|re)` with `i` just after the apostrophe: the end of the contraction, if any.
fn contraction(s: &[u8], i: usize) -> Option<usize> {
    let (a, i) = folded(s, i)?;
    if matches!(a, 's' | 'd' | 'm' | 't') {
        return Some(i);
    }
    let (b, j) = folded(s, i)?;
    matches!((a, b), ('l', 'l') | ('v', 'e') | ('r', 'e')).then_some(j)
}

/// The character at `i` as `(?i:...)` compares it to ASCII letters, and the index after it.
fn folded(s: &[u8], i: usize) -> Option<(char, usize)> {
    let (c, next) = match *s.get(i)? {
        b if b < 0x80 => (b as char, i + 1),
        _ => {
            let (cp, next) = decode(s, i);
            (char::from_u32(cp)?, next)
        }
    };
    let folded = match ASCII_CASE_FOLDS.iter().find(|&&(from, _)| from == c) {
        Some(&(_, letter)) => letter as char,
        None => c.to_ascii_lowercase(),
    };
    Some((folded, next))
}

/// The end of the run of `class` characters starting at `i`.
#[inline]
fn run(s: &[u8], mut i: usize, of: Class) -> usize {
    while i < s.len() {
        let b = s[i];
        if b < 0x80 {
            if ASCII[b as usize] != of {
                break;
            }
            i += 1;
        } else {
            let (cp, next) = decode(s, i);
            if class(cp) != of {
                break;
            }
            i = next;
        }
    }
    i
}

/// The end of at most `max` more number characters from `i`.
fn numbers(s: &[u8], mut i: usize, max: usize) -> usize {
    for _ in 0..max {
        match peek(s, i) {
            Some((Class::Number, next)) => i = next,
            _ => break,
        }
    }
    i
}

/// `[\r\n]*` from `i`.
fn newlines(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && (s[i] == b'\r' || s[i] == b'\n') {
        i += 1;
    }
    i
}

/// The class of the character at `i` and the index after it; `None` at the end of the text.
#[inline]
fn peek(s: &[u8], i: usize) -> Option<(Class, usize)> {
    let b = *s.get(i)?;
    if b < 0x80 {
        return Some((ASCII[b as usize], i + 1));
    }
    let (cp, next) = decode(s, i);
    Some((class(cp), next))
}

#[inline]
fn class_at(s: &[u8], i: usize) -> Option<Class> {
    peek(s, i).map(|(c, _)| c)
}

/// Decodes the non-ASCII character at `i` of valid UTF-8: (code point, index after it).
#[inline]
fn decode(s: &[u8], i: usize) -> (u32, usize) {
    let cont = |k: usize| (s[i + k] & 0x3F) as u32;
    let b = s[i] as u32;
    if b < 0xE0 {
        (((b & 0x1F) << 6) | cont(1), i + 2)
    } else if b < 0xF0 {
        (((b & 0x0F) << 12) | (cont(1) << 6) | cont(2), i + 3)
    } else {
        (((b & 0x07) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3), i + 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(text: &str, pattern: Pattern) -> Vec<&str> {
        split(text, pattern).collect()
    }

    #[test]
    fn words_numbers_and_punctuation() {
        let text = "Hello, world! It's 12345 o'clock...\n";
        let expected = ["Hello", ",", " world", "!", " It", "'s", " ", "123", "45", " o", "'clock", "...\n"];
        assert_eq!(chunks(text, Pattern::Gpt4), expected);
        assert_eq!(chunks("12345", Pattern::Nanochat), ["12", "34", "5"]);
    }

    #[test]
    fn whitespace_backtracking() {
        assert_eq!(chunks(" \t x", Pattern::Gpt4), [" \t", " x"]);
        assert_eq!(chunks("a  \n\n  b", Pattern::Gpt4), ["a", "  \n\n", " ", " b"]);
        assert_eq!(chunks("a   1", Pattern::Gpt4), ["a", "  ", " ", "1"]);
        assert_eq!(chunks("a \t ", Pattern::Gpt4), ["a", " \t "]);
        assert_eq!(chunks("\t!", Pattern::Gpt4), ["\t", "!"]);
    }

    #[test]
    fn contractions_fold_case() {
        // U+017F (long s) case-folds to s, so it ends a contraction.
        assert_eq!(chunks("WE'LL 'Ve 'ſx", Pattern::Gpt4), ["WE", "'LL", " '", "Ve", " '", "ſx"]);
        assert_eq!(chunks("'ſx'l", Pattern::Gpt4), ["'ſ", "x", "'l"]);
    }

    #[test]
    fn non_ascii_classes() {
        // U+00A0 is \s and glues to a word; U+0301 (combining) is "other"; U+0663 is a number.
        assert_eq!(chunks("\u{a0}né\u{301}e\u{663}\u{663}", Pattern::Gpt4), ["\u{a0}né", "\u{301}e", "\u{663}\u{663}"]);
        // U+001C is not \s for `regex`, so it is punctuation.
        assert_eq!(chunks(" \u{1c}\n\nx", Pattern::Gpt4), [" \u{1c}\n\n", "x"]);
    }

    #[test]
    fn chunks_cover_the_text() {
        let text = "  Mixed: ÀÉ 日本語 १२३ 👍🏽\r\n\u{2028}end ";
        assert_eq!(chunks(text, Pattern::Gpt4).concat(), text);
        assert!(chunks("", Pattern::Gpt4).is_empty());
    }

    #[test]
    fn whole_text_is_one_chunk() {
        let text = "  Mixed: 日本語 12345\r\n\n end ";
        assert_eq!(chunks(text, Pattern::Whole), [text]);
        assert_eq!(chunks("x", Pattern::Whole), ["x"]);
        assert!(chunks("", Pattern::Whole).is_empty());
        assert_eq!(Pattern::from_id(2), Some(Pattern::Whole));
    }
}
