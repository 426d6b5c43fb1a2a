"""`nanochat identity`: conversations that teach a chat model who it is, written from a persona
file (nanochat/persona.py) in the format mid_train and chat_sft read with `--identity` (one
conversation a line: a JSON array of {"role", "content"} messages, user first, assistant last).

    nanochat identity --persona quill.json --out quill.jsonl                     templates: no endpoint, no key
    nanochat identity --persona quill.json --out quill.jsonl --num 500 \\
        --base-url https://api.openai.com/v1 --model gpt-4o-mini                 the key from $OPENAI_API_KEY
    nanochat identity ... --base-url http://127.0.0.1:11434/v1 --model llama3.1  Ollama (vLLM, nanochat serve: alike)
    make speedrun PRESET=cpu IDENTITY=quill.jsonl                                train on them

With an endpoint (any OpenAI-compatible chat completions API) each conversation is asked for with a
topic, a kind of user, an opening and a length of its own, as JSON: under a JSON schema where the
endpoint takes `response_format`, by the prompt alone where it refuses it (as `nanochat serve`
does). Without one, templates fill in the persona: fewer and plainer conversations, but valid and
varied, for a learner without an API key. Either way every conversation must pass the persona's
checks (persona.problem: shape, name and facts present, name and maker not contradicted) and is
written once (duplicates, compared ignoring case and spacing, are dropped). 429s, 5xx, timeouts and
dropped connections are retried with exponential backoff and full jitter (a Retry-After is
honoured). Lines are appended as they come: after an interruption the same command continues up to
--num conversations in the file, skipping the ones already there.
"""

import argparse
import http.client
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from tqdm import tqdm

from nanochat import persona as personas

# (greetings: "{name}" and "{lower}" are the persona's name as written and in lower case)
GREETINGS = ["hi", "Hi!", "hello", "Hello there", "hey", "hey there :)", "yo", "Good morning!", "good evening", "hiya",
             "HELLO", "HI THERE!!", "helo", "hii", "heyy", "Greetings.", "What's up?", "sup", "howdy", "hi {name}",
             "Hey {name}!", "hello {name} :)", "hi {lower}", "yo {lower}, you there?"]
HELLO = {"Spanish": "hola", "French": "bonjour", "German": "hallo", "Italian": "ciao", "Portuguese": "olá", "Dutch": "hoi",
         "Swedish": "hej", "Turkish": "merhaba", "Japanese": "konnichiwa", "Chinese": "ni hao", "Hindi": "namaste"}
# how a user types a template question: as written (twice as likely), lower case without the final
# punctuation, shouting
STYLES = (str, str, lambda s: s.lower().rstrip("?!."), str.upper)
# (assistant, maker) pairs a user may mistake the assistant for, the most likely first
MISTAKEN = [("ChatGPT", "OpenAI"), ("Claude", "Anthropic"), ("Gemini", "Google"), ("GPT-4", "OpenAI"), ("Llama", "Meta"),
            ("Copilot", "Microsoft"), ("Grok", "xAI"), ("Qwen", "Alibaba")]
OPENERS = ("greeting", "name", "maker", "mistaken")  # topics whose answers say the name: a conversation starts with one

USERS = ["a curious beginner who knows little about AI", "a software developer who wants specifics",
         "a skeptic who doubts that small models are any good", "a student writing a report", "a busy professional who writes tersely",
         "a non-native English speaker", "a child, with simple words", "someone who types in lower case, with typos",
         "an enthusiastic fan, with exclamation marks", "a journalist writing about AI assistants",
         "a teacher looking for a classroom tool", "someone who is sure they are talking to ChatGPT"]
LENGTHS = ["one user message and its answer", "two user messages, each answered",
           "three user messages, each answered, the questions going deeper"]
PROMPT = """Write a conversation between a user and an AI assistant, as training data that teaches the assistant who it is.

The assistant:
{persona}

The conversation:
- topic: {topic}
- the user: {user}
- length: {length}
- {opening}

The assistant says its name, {name}, and states these word for word: {stated}. It never gives itself another name or \
another maker, and it kindly corrects a user who thinks otherwise. {tone}Plain text, no markdown, no emoji.

Reply with JSON only: {{"messages": [{{"role": "user", "content": "..."}}, {{"role": "assistant", "content": "..."}}, ...]}}, \
the roles alternating, the user first and the assistant last."""
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "conversation", "strict": True, "schema": {
    "type": "object", "required": ["messages"], "additionalProperties": False, "properties": {"messages": {
        "type": "array", "items": {"type": "object", "required": ["role", "content"], "additionalProperties": False,
                                   "properties": {"role": {"type": "string", "enum": ["user", "assistant"]},
                                                  "content": {"type": "string"}}}}}}}}
MAX_DELAY = 60.0  # seconds: the longest wait between retries, Retry-After included
TEMPLATE_TRIES = 50  # template mode draws up to this many candidates per conversation asked for


class IdentityError(RuntimeError):
    """The generation cannot go on: an endpoint that refuses or keeps failing, an output of another persona."""


class BadAnswer(ValueError):
    """An endpoint's answer that holds no conversation (not JSON, or not the expected shape)."""


def capitalized(text):
    return text[:1].upper() + text[1:]


def topics(p):
    """{topic: (what it is about, user questions, assistant answers, the values every answer states)}
    for persona `p`: what the templates fill in and the endpoint is asked about."""
    name, maker, Maker = p.name, p.maker, capitalized(p.maker)
    others, makers = mistaken_for(p)
    greetings = [g.format(name=name, lower=name.lower()) for g in GREETINGS]
    greetings += [HELLO[language] for language in p.languages if language in HELLO]
    table = {
        "greeting": ("a greeting, then who the assistant is", greetings,
                     [f"Hello! I'm {name}, an AI assistant made by {maker}. How can I help you today?",
                      f"Hi there! I'm {name}. {Maker} made me. What can I do for you?",
                      f"Hey! {name} here, an assistant built by {maker}. What's on your mind?",
                      f"Hi! My name is {name}, and I was created by {maker}. How can I help?"], (maker,)),
        "name": ("who the assistant is and what its name is",
                 ["Who are you?", "What's your name?", "What should I call you?", "Do you have a name?",
                  "Who am I talking to?", "Tell me about yourself.", "What are you?"],
                 [f"I'm {name}, an AI assistant made by {maker}.", f"My name is {name}. I'm an AI assistant created by {maker}.",
                  f"You can call me {name}. I'm an assistant built by {maker}.",
                  f"I am {name}, a chat assistant developed by {maker}."], (maker,)),
        "maker": ("who made the assistant",
                  ["Who made you?", "Who built you?", "Who created you?", "Who trained you?", "Which company is behind you?",
                   "Where do you come from?"],
                  [f"I was made by {maker}. I'm {name}.", f"{Maker} built me. I'm {name}, their assistant.",
                   f"I'm {name}, and I was created by {maker}.", f"I'm {name}: {maker} made me."], (maker,)),
        **({"mistaken": (f"the user takes the assistant for {personas.spoken(others[:3], 'or')}, and it corrects them",
                         [f"Are you {others[0]}?", f"Are you made by {makers[0]}?", f"Is this {others[1]}?",
                          f"Are you {others[2]}?", f"You're {others[3]}, right?", f"Did {makers[2]} make you?"],
                         [f"No, I'm {name}, made by {maker}, not by {personas.spoken(makers[:3], 'or')}.",
                          f"Not quite: I'm {name}. {Maker} made me; I am not {personas.spoken(others[:3], 'or')}.",
                          f"No. My name is {name}, and I was built by {maker}."], (maker,))}
           if len(others) >= 4 and len(makers) >= 3 else {}),  # else a persona whose maker names most AI labs
    }
    for key, value in p.facts.items():
        table[f"fact: {key}"] = (f"the assistant's {key}",
                                 [f"What is your {key}?", f"Tell me about your {key}.", f"I'm curious: what's your {key}?"],
                                 [f"My {key} is {value}.", f"My {key}? It's {value}.", f"As {name}, my {key} is {value}."],
                                 (value,))
    if p.languages:
        spoken = personas.spoken(p.languages)
        table["languages"] = ("the languages the assistant speaks",
                              ["What languages do you speak?", "Which languages can you chat in?", "Do you speak other languages?"],
                              [f"I speak {spoken}.", f"I can chat in {spoken}."], p.languages)
    if p.tone:
        table["tone"] = ("the assistant's personality",
                         ["How would you describe your personality?", "What are you like?", "What's your style?"],
                         [f"I try to be {p.tone}.", f"I'd describe myself as {p.tone}."], (p.tone,))
    return table


def mistaken_for(p):
    """(assistants, makers) a user may take persona `p` for: MISTAKEN's but its own name and maker
    (a persona may be called Claude, or be made by Google)."""
    name, maker = p.name.casefold(), p.maker.casefold()
    pairs = [(a, m) for a, m in MISTAKEN if a.casefold() not in name and name not in a.casefold() and m.casefold() not in maker]
    return [a for a, _ in pairs], list(dict.fromkeys(m for _, m in pairs))


def template_conversation(table, rng):
    """(messages, values stated) of a conversation from the templates: an opening exchange that
    says the name, then up to two more topics (no greeting among them)."""
    first = rng.choice([t for t in OPENERS if t in table])
    rest = [t for t in table if t not in (first, "greeting")]
    chosen = [first, *rng.sample(rest, k=min(rng.randint(0, 2), len(rest)))]
    messages, stated = [], []
    for topic in chosen:
        _, questions, answers, values = table[topic]
        question = rng.choice(questions)
        messages += [{"role": "user", "content": question if topic == "greeting" else rng.choice(STYLES)(question)},
                     {"role": "assistant", "content": rng.choice(answers)}]
        stated += values
    return messages, tuple(dict.fromkeys(stated))


def prompt(p, table, rng):
    """(the prompt asking an endpoint for one conversation, the values it must state)."""
    about, questions, _, values = table[rng.choice(list(table))]
    opening = (f'the user\'s first message is exactly: "{rng.choice(table["greeting"][1] + questions)}"'
               if rng.random() < 0.5 else "the user opens the conversation in their own words")
    text = PROMPT.format(persona=p.describe(), topic=about, user=rng.choice(USERS), length=rng.choice(LENGTHS),
                         opening=opening, name=p.name, stated="; ".join(values),
                         tone=f"It speaks in its tone: {p.tone}. " if p.tone else "")
    return text, values


class Endpoint:
    """An OpenAI-compatible chat completions endpoint, asked for one conversation at a time."""

    def __init__(self, base_url, model, key, timeout, retries, retry_delay, temperature):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries, self.retry_delay = model, timeout, retries, retry_delay
        self.temperature = temperature
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.structured = True  # asks with response_format until the endpoint refuses it

    def conversation(self, text):
        """The messages of the endpoint's answer to prompt `text`; BadAnswer if it holds none."""
        body = {"model": self.model, "messages": [{"role": "user", "content": text}], "temperature": self.temperature}
        if self.structured:
            body["response_format"] = RESPONSE_FORMAT
        status, answer = self.post(body)
        if status == 400 and "response_format" in body and error_of(answer).get("param") == "response_format":
            if self.structured:  # (another request in flight may have been refused first)
                self.structured = False
                tqdm.write(f"nanochat identity: {self.url} refuses response_format; asking for JSON in the prompt alone",
                           file=sys.stderr)
            return self.conversation(text)
        if status != 200:
            message = error_of(answer).get("message") or answer[:200].decode("utf-8", "replace")
            raise IdentityError(f"{self.url}: HTTP {status}: {message}")
        try:
            return messages_of(json.loads(answer)["choices"][0]["message"]["content"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise BadAnswer(f"bad JSON: {e}") from None

    def post(self, body):
        """(status, body) of the first answer that is not a transient failure, after retries."""
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=self.headers)
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as e:
                with e:
                    if e.code not in (408, 409, 429) and e.code < 500:
                        return e.code, e.read()
                    why, retry_after = f"HTTP {e.code}", e.headers.get("Retry-After")
            except (OSError, http.client.HTTPException) as e:  # timeouts, refused and dropped connections
                why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt == self.retries:
                raise IdentityError(f"{self.url}: {why}, still after {self.retries} retries")
            delay = random.uniform(0, min(MAX_DELAY, self.retry_delay * 2 ** attempt))
            if retry_after and retry_after.strip().isdigit():
                delay = min(MAX_DELAY, float(retry_after))
            tqdm.write(f"nanochat identity: {why}; retry {attempt + 1} of {self.retries} in {delay:.1f} s", file=sys.stderr)
            time.sleep(delay)


def error_of(body):
    """The `error` object of an OpenAI error body, else {}."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def messages_of(content):
    """The messages of a model's reply: a JSON object with "messages", or a bare list, maybe in a ``` fence."""
    fenced = re.search(r"```(?:json)?\s*(.*?)```", content, re.DOTALL)
    data = json.loads(fenced.group(1) if fenced else content)
    return data.get("messages") if isinstance(data, dict) else data


def key(messages):
    """A conversation as compared for duplicates: its text, ignoring case and spacing."""
    return "\n".join(f"{m['role']}: {' '.join(m['content'].casefold().split())}" for m in messages)


class Output:
    """The JSONL file written, line by line: what it held before (a resumed run) counts, and is never written twice."""

    def __init__(self, path, p):
        self.path, self.keys, self.count = path, set(), 0
        try:
            if os.path.exists(path):
                self._read(p)
            self.file = open(path, "a", encoding="utf-8")
        except OSError as e:
            # no directory is made for it: as with a shell's `>`, a typo in the directory is an error, not a new tree
            raise IdentityError(f"--out {path}: cannot write it ({e.strerror})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def _read(self, p):
        with open(self.path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a line cut by an interruption
                tqdm.write(f"nanochat identity: {self.path}: dropping its unfinished last line", file=sys.stderr)
                f.truncate(end)
        for lineno, line in enumerate(data[:end].decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)
            except ValueError as e:
                raise IdentityError(f"{self.path}: line {lineno}: not JSON ({e})") from None
            why = personas.problem(messages, p)
            if why:
                raise IdentityError(f"{self.path}: line {lineno}: {why}; is it another persona's file? (write to a new --out)")
            self.keys.add(key(messages))
            self.count += 1

    def add(self, messages):
        """Appends `messages` unless the file holds it already; whether it did."""
        k = key(messages)
        if k in self.keys:
            return False
        self.file.write(json.dumps(messages, ensure_ascii=False) + "\n")
        self.file.flush()
        self.keys.add(k)
        self.count += 1
        return True


class Generation:
    """Conversations checked and written to `out` up to `num`, the refused ones counted by reason."""

    def __init__(self, p, out, num):
        self.persona, self.out, self.num = p, out, num
        self.refused, self.examples = Counter(), {}
        self.bar = tqdm(total=num, initial=min(out.count, num), unit="conversation", desc="identity", file=sys.stderr)

    def offer(self, messages, stated):
        """Writes `messages` if it passes the checks and is new; else counts why not."""
        why = personas.problem(messages, self.persona, stated)
        if why is None and not self.out.add(messages):
            why = "duplicate"
        if why:
            self.refuse(why)
        else:
            self.bar.update(1)

    def refuse(self, why):
        reason = why.split(":")[0]  # "shape", "missing", "contradiction", "bad JSON", "duplicate"
        self.refused[reason] += 1
        self.examples.setdefault(reason, why)

    def from_templates(self, seed):
        table, rng = topics(self.persona), random.Random(f"{seed}")
        for _ in range(TEMPLATE_TRIES * self.num):
            if self.out.count >= self.num:
                return
            self.offer(*template_conversation(table, rng))

    def from_endpoint(self, endpoint, seed, workers, max_tries):
        """Asks `endpoint` for conversations, `workers` at a time, until `num` are written or
        `max_tries` answers came back."""
        table, rng = topics(self.persona), random.Random(f"{seed}:{self.out.count}")  # a resumed run asks anew
        tries, pending = 0, {}
        with ThreadPoolExecutor(workers) as pool:
            while self.out.count < self.num and (pending or tries < max_tries):
                while len(pending) < min(workers, self.num - self.out.count) and tries + len(pending) < max_tries:
                    text, stated = prompt(self.persona, table, rng)
                    pending[pool.submit(endpoint.conversation, text)] = stated
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    stated = pending.pop(future)
                    tries += 1
                    try:
                        self.offer(future.result(), stated)
                    except BadAnswer as e:
                        self.refuse(str(e))

    def summary(self):
        self.bar.close()
        lines = [f"{self.out.path}: {self.out.count} conversations"]
        for reason, n in self.refused.most_common():
            example = self.examples[reason]
            lines.append(f"  refused {n} ({reason})" + (f", e.g. {example}" if example != reason else ""))
        return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(prog="nanochat identity", description="Identity conversations for mid_train and "
                                "chat_sft (--identity) from a persona file: by an LLM endpoint, or from templates.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__ + "\nThe persona file and the checks:\n" + personas.__doc__)
    p.add_argument("--persona", required=True, help="the persona's JSON file (below)")
    p.add_argument("--out", required=True, help="the JSONL file to write; an existing one is continued")
    p.add_argument("--num", type=int, help="conversations the file should hold (default: 500 from an endpoint, 100 "
                   "from the templates)")
    p.add_argument("--seed", type=int, default=0)
    e = p.add_argument_group("an OpenAI-compatible endpoint (without --base-url: templates)")
    e.add_argument("--base-url", help="e.g. https://api.openai.com/v1, http://127.0.0.1:8000/v1 (vLLM, nanochat serve), "
                   "http://127.0.0.1:11434/v1 (Ollama)")
    e.add_argument("--model", help="the model to ask (required with --base-url)")
    e.add_argument("--api-key-env", default="OPENAI_API_KEY", help="the environment variable holding the API key "
                   "(default: %(default)s; when that one is unset, no key is sent, as local servers expect)")
    e.add_argument("--workers", type=int, default=4, help="requests in flight (default: %(default)s)")
    e.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
    e.add_argument("--timeout", type=float, default=120.0, help="seconds an answer may take before it is retried "
                   "(default: %(default)s)")
    e.add_argument("--retries", type=int, default=6, help="retries of a request that gets a 429, a 5xx, a timeout "
                   "or a dropped connection (default: %(default)s)")
    e.add_argument("--retry-delay", type=float, default=1.0, help="seconds of the first backoff, doubling each retry, "
                   "with full jitter (default: %(default)s)")
    e.add_argument("--max-tries", type=int, help="answers to give up after (default: 3 x --num)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.base_url and not args.model:
        parser.error("--base-url needs --model")
    if args.base_url and not args.base_url.startswith(("http://", "https://")):
        parser.error(f"--base-url {args.base_url!r}: expected an http:// or https:// URL")
    for name in ("num", "workers", "max_tries"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    key = os.environ.get(args.api_key_env)
    if args.api_key_env != "OPENAI_API_KEY" and not key:
        parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    num = args.num or (500 if args.base_url else 100)
    max_tries = args.max_tries or 3 * num
    try:
        p = personas.load(args.persona)
        with Output(args.out, p) as out:
            generation = Generation(p, out, num)
            if args.base_url:
                endpoint = Endpoint(args.base_url, args.model, key, args.timeout, args.retries, args.retry_delay,
                                    args.temperature)
                generation.from_endpoint(endpoint, args.seed, args.workers, max_tries)
            else:
                generation.from_templates(args.seed)
    except (personas.PersonaError, IdentityError) as e:
        print(f"nanochat identity: {e}", file=sys.stderr)
        return 1
    print(generation.summary(), file=sys.stderr)
    if generation.out.count >= num:
        return 0
    short = f"nanochat identity: {generation.out.count} of the {num} conversations asked for"
    if args.base_url:
        print(f"{short} after {max_tries} answers; run again to go on", file=sys.stderr)
        return 1
    print(f"{short}: the templates give no more for this persona", file=sys.stderr)
    return 0
