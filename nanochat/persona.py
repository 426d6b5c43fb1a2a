"""A persona: who a chat model says it is, read from a small JSON file, and the checks every
generated identity conversation must pass against it (`nanochat identity`, nanochat/identity.py).

    {
      "name": "Quill",
      "maker": "the Lantern Lab",
      "facts": {"purpose": "helping people write clearly", "home": "Lisbon"},
      "tone": "warm, concise and a little playful",
      "languages": ["English", "Portuguese"]
    }

`name` and `maker` are required; `facts` (each read as "my <key> is <value>": keep values short, a
conversation must state them word for word), `tone` and `languages` are optional. JSON rather than
TOML: Python 3.10, which nanochat supports, has no tomllib.

What `problem` checks (the text, not its meaning: cheap, and the same for every endpoint):
- shape: user and assistant turns alternating, user first, assistant last, every text non-empty;
- presence: the name and each value the conversation was asked to state appear (ignoring case) in
  the assistant's turns;
- the name is not contradicted: the assistant never names itself otherwise ("my name is X", "call
  me X", "I'm called X") nor says it is another assistant ("I am ChatGPT", "I'm Claude", ...);
- the maker is not contradicted: every "made/created/built/developed/trained/designed/programmed
  by X" of the assistant names the maker, and no sentence with such a verb names another AI maker
  (OpenAI, Anthropic, Google, ...) unless it negates ("not OpenAI", "wasn't", "never").
Other facts are checked for presence only: a paraphrase that changes one is not caught. The checks
err on the side of refusing (a sentence "OpenAI made ChatGPT" is refused too): a refused
conversation costs one more request, a wrong one teaches the model a wrong fact.
"""

import json
import re
from dataclasses import dataclass, field

FIELDS = ("name", "maker", "facts", "tone", "languages")
# assistants and makers a generating model is likely to mistake itself for
ASSISTANTS = ("ChatGPT", "GPT-4o", "GPT-4", "GPT-3.5", "GPT", "Claude", "Gemini", "Bard", "Llama", "Copilot", "Grok",
              "Mistral", "Qwen", "DeepSeek", "nanochat")
MAKERS = ("OpenAI", "Anthropic", "Google", "DeepMind", "Meta", "Microsoft", "Mistral AI", "xAI", "Alibaba", "DeepSeek")
MAKING = r"(?:made|created|built|developed|trained|designed|programmed)"
NEGATION = re.compile(r"\b(?:not|never|no|nor|unlike)\b|n't\b", re.IGNORECASE)
SELF_NAMING = re.compile(r"(?i:\bmy name is|\bcall me|\bi am called|\bi'm called|\bi am named|\bi'm named)\s+([A-Z][\w-]*)")
MADE_BY = re.compile(rf"\b{MAKING}\s+by\s+([^.,;:!?\n]*)", re.IGNORECASE)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
MAKER = "\0"  # stands for the persona's maker in a text being checked, so that its own punctuation ends nothing


class PersonaError(ValueError):
    """A persona file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Persona:
    name: str
    maker: str
    facts: dict = field(default_factory=dict)  # key -> value: "my <key> is <value>"
    tone: str = ""
    languages: tuple = ()

    def describe(self):
        """The persona as lines of text, for a prompt."""
        lines = [f"Name: {self.name}", f"Made by: {self.maker}"]
        lines += [f"Its {key}: {value}" for key, value in self.facts.items()]
        if self.tone:
            lines.append(f"Tone: {self.tone}")
        if self.languages:
            lines.append(f"Languages it speaks: {spoken(self.languages)}")
        return "\n".join(lines)


def spoken(items, conjunction="and"):
    """"English", "English and Portuguese", "English, Portuguese and French"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {conjunction} " + items[-1]


def load(path):
    """The Persona of a JSON file; a PersonaError names the file and the field that is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise PersonaError(f"{path}: cannot read the persona file ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PersonaError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise PersonaError(f"{path}: expected a JSON object with {', '.join(FIELDS)}, got {type(data).__name__}")
    unknown = [key for key in data if key not in FIELDS]
    if unknown:
        raise PersonaError(f"{path}: unknown field {unknown[0]!r} (known: {', '.join(FIELDS)})")

    def text(value, where, required=True):
        if value is None and not required:
            return ""
        if not isinstance(value, str) or not value.strip():
            raise PersonaError(f"{path}: field {where!r} must be a non-empty string, got {value!r}")
        return " ".join(value.split())

    facts = data.get("facts", {})
    if not isinstance(facts, dict):
        raise PersonaError(f"{path}: field 'facts' must be an object of key -> value, got {type(facts).__name__}")
    languages = data.get("languages", [])
    if not isinstance(languages, list):
        raise PersonaError(f"{path}: field 'languages' must be a list of strings, got {type(languages).__name__}")
    if missing := [name for name in ("name", "maker") if name not in data]:
        raise PersonaError(f"{path}: field {missing[0]!r} is missing (a persona needs {', '.join(FIELDS[:2])})")
    return Persona(name=text(data["name"], "name"), maker=text(data["maker"], "maker"),
                   facts={text(key, f"facts key {key!r}"): text(value, f"facts.{key}") for key, value in facts.items()},
                   tone=text(data.get("tone"), "tone", required=False),
                   languages=tuple(text(x, f"languages[{i}]") for i, x in enumerate(languages)))


def problem(messages, persona, stated=()):
    """Why `messages` is not a good identity conversation of `persona` (checked as the module
    docstring says), or None. `stated`: the values it was asked to state, besides the name."""
    if not isinstance(messages, list) or len(messages) < 2:
        return "shape: a conversation is a list of at least 2 messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            return f"shape: message {i} must be an object with just 'role' and 'content'"
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            return f"shape: message {i} has role {m['role']!r}; roles alternate user, assistant, user first"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"shape: message {i} has no text"
    if messages[-1]["role"] != "assistant":
        return "shape: the last message must be the assistant's"
    said = [m["content"] for m in messages if m["role"] == "assistant"]
    folded = " ".join(" ".join(said).split()).casefold()
    for value in (persona.name, *stated):
        if " ".join(value.split()).casefold() not in folded:
            return f"missing: the assistant never says {value!r}"
    return next(filter(None, (contradiction(text, persona) for text in said)), None)


def contradiction(text, persona):
    """How an assistant message contradicts the persona's name or maker, or None."""
    name = persona.name.casefold()
    for m in SELF_NAMING.finditer(text):
        if not name.startswith(m.group(1).casefold()):
            return f"contradiction: it calls itself {m.group(1)!r}, not {persona.name!r}"
    others = [a for a in ASSISTANTS if a.casefold() != name]
    claimed = re.search(rf"(?i:\b(?:i am|i'm)\s+(?:an?\s+)?)({'|'.join(map(re.escape, others))})\b", text)
    if claimed:
        return f"contradiction: it says it is {claimed.group(1)}"
    maker = re.sub(r"^the\s+", "", persona.maker, flags=re.IGNORECASE)
    # "made by Acme, Inc. in 2020": the maker's comma and period end neither its clause nor its
    # sentence, but a sentence that ends with it ends ("... Acme, Inc. Google made me.")
    text = re.sub(r"(?<!\w)" + r"\s+".join(map(re.escape, maker.split())) + r"(?!\w)(?P<end>(?<=[.!?])(?=\s+[A-Z]))?",
                  lambda m: MAKER + ("." if m.group("end") is not None else ""), text, flags=re.IGNORECASE)
    maker = maker.casefold()
    for sentence in SENTENCE_END.split(text):
        for m in MADE_BY.finditer(sentence):
            clause = re.split(r"[,;:]", sentence[:m.start()])[-1]
            if MAKER not in m.group(1) and not NEGATION.search(clause):
                return f"contradiction: made by {m.group(1).strip()!r}, not {persona.maker!r}"
        if re.search(rf"\b{MAKING}\b", sentence, re.IGNORECASE) and not NEGATION.search(sentence):
            for other in MAKERS:
                if other.casefold() not in maker and re.search(rf"\b{re.escape(other)}\b", sentence, re.IGNORECASE):
                    return f"contradiction: it credits {other} with making it"
    return None
