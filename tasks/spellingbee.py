"""SpellingBee: spelling and letter counting, generated from an English word list.

Two kinds of example, chosen per index: "spell" (spell a word out: `#### a-p-p-l-e`) and "count"
(how many times a letter occurs; the assistant spells the word keeping a running count, checks with
the python tool, `'strawberry'.count('r')`, and answers `#### 3`). Example i is generated from a
random.Random seeded by (split, i) alone, so it is the same on every machine and run. Words are
split by a hash: about one in ten belongs to "test" only, so test words are unseen in training.
"""

import random
import re
import zlib
from functools import cached_property

from tasks.common import FileTask, final_answer, parse_number, read_text_lines

SPLITS = ("train", "test")
KINDS = ("spell", "count")
WORD_RE = re.compile(r"[a-z]+")
SPELL_PROMPTS = [
    "Spell the word {w}.",
    "How do you spell {w}?",
    "Can you spell {w} for me?",
    "spell {w}",
    "What are the letters of the word {w}?",
    "Please spell out {w} letter by letter.",
    "How is {w} spelled?",
    "Write out the spelling of {w}.",
]
COUNT_PROMPTS = [
    "How many {l} are in {w}?",
    "How many times does the letter {l} appear in {w}?",
    "Count the letter {l} in the word {w}.",
    "how many {l}s are there in {w}",
    "In the word {w}, how many times does {l} occur?",
    "How many {l}'s does {w} have?",
    "What is the number of {l} letters in {w}?",
    "Count how many times {l} shows up in {w}.",
]
QUOTES = ["'{}'", '"{}"', "{}"]


def spelled(word):
    return "-".join(word)


def count_parts(word, letter):
    """Assistant parts for counting `letter` in `word`: spell with a running count, check in python."""
    n, tally = 0, []
    for c in word:
        if c == letter:
            n += 1
            tally.append(f"{c} ({n})")
        else:
            tally.append(c)
    found = f"That makes {n}." if n else f"None of them is '{letter}', so that makes 0."
    times = "time" if n == 1 else "times"
    return [
        {"type": "text",
         "text": f"Let me spell '{word}' and count each '{letter}' as I go:\n{', '.join(tally)}\n{found} Let me check with Python: "},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(word.count(letter))},
        {"type": "text", "text": f"\nThe letter '{letter}' appears {n} {times} in '{word}'.\n\n#### {n}"},
    ]


class SpellingBee(FileTask):
    eval_type = "generative"

    def __init__(self, size=1000, split="train", kinds=KINDS, **kwargs):
        """`size` examples of the given `kinds`; `path` may replace the registry's word list."""
        assert isinstance(size, int) and size >= 0, f"size must be an int >= 0, got {size!r}"
        assert split in SPLITS, f"SpellingBee split must be one of {SPLITS}, got {split!r}"
        assert kinds and set(kinds) <= set(KINDS), f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}"
        super().__init__("words/words_alpha.txt", **kwargs)
        self.size, self.split, self.kinds = size, split, tuple(kinds)

    def read(self, uri):
        return read_text_lines(uri)

    def parse(self, line):
        word = line.strip()
        if not WORD_RE.fullmatch(word):
            raise ValueError(f"expected one lowercase word (a-z), got {line!r:.80}")
        return word

    @cached_property
    def words(self):
        """The words of this split (the full list is `self.rows`)."""
        words = [w for w in self.rows if (zlib.crc32(w.encode()) % 10 == 0) == (self.split == "test")]
        assert words, f"no {self.split} words in {self.uri}"
        return words

    def num_examples(self):
        return self.size

    def get_example(self, index):
        assert 0 <= index < self.size, f"SpellingBee index {index} out of range ({self.size} examples)"
        rng = random.Random(f"spellingbee/{self.split}/{index}")
        kind = rng.choice(self.kinds)
        word = rng.choice(self.words)
        shown = rng.choice(QUOTES).format(word.capitalize() if rng.random() < 0.1 else word)
        if kind == "spell":
            answer = spelled(word)
            prompt = rng.choice(SPELL_PROMPTS).format(w=shown)
            content = f"'{word}' is spelled:\n\n#### {answer}"
            extra = {}
        else:
            # mostly a letter of the word, sometimes one it lacks (the answer 0 must be learned too)
            letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
            answer = str(word.count(letter))
            shown_letter = rng.choice(QUOTES).format(letter.upper() if rng.random() < 0.2 else letter)
            prompt = rng.choice(COUNT_PROMPTS).format(w=shown, l=shown_letter)
            content = count_parts(word, letter)
            extra = {"letter": letter}
        return {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": content}],
            "kind": kind,
            "word": word,
            "answer": answer,
            **extra,
        }

    def evaluate(self, conversation, completion):
        """Whether the answer after `####` is right: the count as a number, or the spelling as
        hyphen-separated letters (case and spaces around hyphens ignored)."""
        assert isinstance(completion, str), f"completion must be a str, got {type(completion).__name__}"
        got = final_answer(completion)
        if got is None:
            return False
        if conversation["kind"] == "count":
            return parse_number(got) == int(conversation["answer"])
        return re.sub(r"\s*-\s*", "-", got.lower()).rstrip(".") == conversation["answer"]
