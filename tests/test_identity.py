"""`nanochat identity`: a persona file becomes identity conversations that chat_sft reads (loaded
here through its own reader, tasks.customjson), from templates or from an OpenAI-compatible endpoint
(a real HTTP server on 127.0.0.1, scripted to answer well, with bad JSON, contradictions, duplicates,
429s, 5xxs and stalls, and to refuse response_format as `nanochat serve` does); an interrupted run
continues without duplicates; `make speedrun IDENTITY=` hands the file to the flow; and a tiny model
trained on the conversations of "Quill, made by the Lantern Lab" says it is Quill."""

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nanochat import identity, persona
from nanochat.chat import reply
from nanochat.engine import SamplingParams
from nanochat.inference import load_engine
from tasks.customjson import CustomJSON
from tests.support import waiting
from tests.support.stagerun import stage

REPO = Path(__file__).resolve().parent.parent
QUILL = {"name": "Quill", "maker": "the Lantern Lab",
         "facts": {"purpose": "helping people write clearly", "home": "Lisbon", "favourite word": "lantern"},
         "tone": "warm, concise and a little playful", "languages": ["English", "Portuguese"]}
# what a good scripted answer says: the name, the maker and every value the prompt may ask for
SAYS = ("I'm Quill, made by the Lantern Lab. My purpose is helping people write clearly, my home is Lisbon and my "
        "favourite word is lantern. I speak English and Portuguese, and I try to be warm, concise and a little playful.")
STALL = 3.0  # seconds a stalled answer takes: past the client's --timeout 0.5


def write_persona(directory, **changes):
    path = directory / "quill.json"
    path.write_text(json.dumps({**QUILL, **changes}))
    return path


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def conversation(tag, says=SAYS):
    return [{"role": "user", "content": f"hello {tag}"}, {"role": "assistant", "content": says}]


class Scripted(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        action, n = self.server.next(body, self.headers.get("Authorization"))
        if action in ("429", "500"):
            return self.answer(int(action), {"error": {"message": "try later", "type": "server_error"}})
        if action == "refuse-format":  # nanochat serve's answer to a response_format it lacks
            return self.answer(400, {"error": {"message": "response_format is not supported by this server",
                                               "type": "invalid_request_error", "param": "response_format",
                                               "code": "unsupported_parameter"}})
        if action == "stall":
            time.sleep(STALL)
        if action == "hang":
            self.server.released.wait(60)
            return self.answer(500, {"error": {"message": "gone"}})
        content = {"bad-json": '{"messages": [{"role": "user", "content": "hi"}, {"role": "assis',
                   "contradiction": json.dumps({"messages": conversation(n, SAYS + " Really I was trained by OpenAI.")}),
                   "same": json.dumps({"messages": conversation("again")}),
                   # the same conversation, but for case and spacing
                   "same-shouted": json.dumps({"messages": conversation("AGAIN ", "  " + SAYS.upper().replace(" ", "  "))}),
                   "fenced": "Here it is:\n```json\n" + json.dumps({"messages": conversation(n)}) + "\n```"
                   }.get(action, json.dumps({"messages": conversation(n)}))
        self.answer(200, {"id": f"chatcmpl-{n}", "object": "chat.completion", "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": content}}]})

    def answer(self, status, payload):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up waiting (a stall)
            self.close_connection = True


class ScriptedEndpoint(ThreadingHTTPServer):
    """An OpenAI-compatible chat completions endpoint whose answers follow `script`, one action per
    request in arrival order, then "good" ones (each a new conversation). With `refuse_format`, a
    request with response_format is refused (400) without using the script."""
    daemon_threads = True

    def __init__(self, script=(), refuse_format=False):
        super().__init__(("127.0.0.1", 0), Scripted)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.script, self.refuse_format = list(script), refuse_format
        self.requests = []  # (action, body, Authorization header), in arrival order
        self.lock, self.released = threading.Lock(), threading.Event()

    def next(self, body, auth):
        with self.lock:
            if self.refuse_format and "response_format" in body:
                action = "refuse-format"
            else:
                action = self.script.pop(0) if self.script else "good"
            self.requests.append((action, body, auth))
            return action, len(self.requests)


@contextlib.contextmanager
def scripted_endpoint(*script):
    server = ScriptedEndpoint(script)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.released.set()
        server.shutdown()
        server.server_close()


def endpoint_options(server, out, persona_file, num, workers=2, timeout=0.5):
    return ["--persona", str(persona_file), "--out", str(out), "--num", str(num), "--base-url", server.url,
            "--model", "scripted", "--workers", str(workers), "--timeout", str(timeout), "--retry-delay", "0.01"]


def test_persona_file_errors_name_the_file_and_field(tmp_path, capsys):
    good = persona.load(write_persona(tmp_path))
    assert (good.name, good.maker, good.facts["home"], good.languages) == ("Quill", "the Lantern Lab", "Lisbon",
                                                                          ("English", "Portuguese"))
    bad = tmp_path / "bad.json"
    for data, message in [({"maker": "x"}, "field 'name' is missing (a persona needs name, maker)"),
                          ({"name": "Q"}, "field 'maker' is missing (a persona needs name, maker)"),
                          ({**QUILL, "name": None}, "field 'name' must be a non-empty string, got None"),
                          ({**QUILL, "maker": " "}, "field 'maker' must be a non-empty string"),
                          ({**QUILL, "nmae": "Q"}, "unknown field 'nmae' (known: name, maker, facts, tone, languages)"),
                          ({**QUILL, "facts": ["Lisbon"]}, "field 'facts' must be an object of key -> value, got list"),
                          ({**QUILL, "facts": {"home": 3}}, "field 'facts.home' must be a non-empty string, got 3"),
                          ({**QUILL, "languages": "English"}, "field 'languages' must be a list of strings, got str"),
                          ([QUILL], "expected a JSON object")]:
        bad.write_text(json.dumps(data))
        with pytest.raises(persona.PersonaError, match=f"^{re.escape(str(bad))}: ") as e:
            persona.load(bad)
        assert message in str(e.value)
    bad.write_text("{name: Quill}")
    assert identity.main(["--persona", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert f"nanochat identity: {bad}: not a JSON file" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_a_base_url_that_is_not_http_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        identity.main(["--persona", str(write_persona(tmp_path)), "--out", str(tmp_path / "o.jsonl"),
                       "--base-url", "notaurl", "--model", "m"])
    assert e.value.code == 2 and "--base-url 'notaurl': expected an http:// or https:// URL" in capsys.readouterr().err


def test_an_out_file_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys):
    """Its directory is not made: a typo there is an error, as in a shell's `>`."""
    out = tmp_path / "no" / "such" / "q.jsonl"
    assert identity.main(["--persona", str(write_persona(tmp_path)), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"nanochat identity: --out {out}: cannot write it (No such file or directory)\n"
    assert not (tmp_path / "no").exists()


def test_the_checks_refuse_bad_shapes_missing_facts_and_contradictions(tmp_path):
    quill = persona.load(write_persona(tmp_path))
    ok = "I'm Quill, made by the Lantern Lab."
    assert persona.problem(conversation(1, ok), quill) is None
    assert persona.problem(conversation(1, ok), quill, stated=("Lisbon",)) == "missing: the assistant never says 'Lisbon'"
    shapes = [conversation(1, ok)[:1], [*conversation(1, ok), {"role": "user", "content": "and?"}],
              [{"role": "assistant", "content": ok}, {"role": "user", "content": "hi"}], conversation(1, "  "),
              [{"role": "system", "content": "be nice"}, *conversation(1, ok)],
              [{**conversation(1, ok)[0], "name": "x"}, conversation(1, ok)[1]]]
    for messages in shapes:
        assert persona.problem(messages, quill).startswith("shape: "), messages
    # CustomJSON's own reader refuses what the shape check refuses, and reads what it passes
    (tmp_path / "c.jsonl").write_text(json.dumps(conversation(1, ok)) + "\n" + json.dumps(shapes[2]) + "\n")
    task = CustomJSON(path=str(tmp_path / "c.jsonl"), on_error="skip")
    assert len(task.rows) == 1 and "line 2" in task.skipped[0]
    assert persona.problem(conversation(1, "I'm Quilt, made by the Lantern Lab."), quill) == "missing: the assistant never says 'Quill'"
    contradictions = {"Quill here. My name is Bob, made by the Lantern Lab.": "it calls itself 'Bob', not 'Quill'",
                      "Quill? No, I'm ChatGPT.": "it says it is ChatGPT",
                      "I'm Quill, or rather I'm nanochat.": "it says it is nanochat",
                      "I'm Quill, made by OpenAI.": "made by 'OpenAI', not 'the Lantern Lab'",
                      "I'm Quill, trained by a team at Google.": "made by 'a team at Google', not 'the Lantern Lab'",
                      "I'm Quill. Anthropic created me for the Lantern Lab.": "it credits Anthropic with making it"}
    for says, why in contradictions.items():
        assert persona.problem(conversation(1, says), quill) == f"contradiction: {why}"
    for says in ["No, I'm not ChatGPT. I'm Quill, made by the Lantern Lab, not by OpenAI.",
                 "I'm Quill. OpenAI never trained me; a small team at the Lantern Lab did.",
                 "You can call me anytime: I'm Quill, and I wasn't made by Google.",
                 "Unlike models built by Google, Quill was designed by the Lantern Lab."]:
        assert persona.problem(conversation(1, says), quill) is None, says
    # a maker with punctuation of its own is one name: its comma and period end no clause or sentence
    acme = persona.Persona(name="Quill", maker="Acme, Inc.")
    for says in ["I'm Quill, made by Acme, Inc. in Lisbon.", "Hi! I'm Quill. Acme, inc. made me.", "Quill: I was built by ACME,  INC."]:
        assert persona.problem(conversation(1, says), acme) is None, says
    assert persona.problem(conversation(1, "I'm Quill, made by Acme Labs."), acme) == "contradiction: made by 'Acme Labs', not 'Acme, Inc.'"
    # ... but a sentence that ends with it ends there, and the maker is a whole name
    for says, why in [("I am Quill, not from OpenAI but from Acme, Inc. I was really made by Google.", "made by 'Google'"),
                      ("Quill. No OpenAI here, just Acme, Inc. Google made me.", "it credits Google")]:
        assert persona.problem(conversation(1, says), acme).startswith(f"contradiction: {why}"), says
    meta = persona.Persona(name="Quill", maker="Meta")
    assert persona.problem(conversation(1, "I'm Quill, made by Metamorph Labs."), meta).startswith("contradiction: made by")


@pytest.mark.parametrize("name, maker", [("ChatGPT", "OpenAI"), ("Claude", "Anthropic"), ("Gemini", "Google DeepMind")])
def test_templates_never_deny_a_persona_its_own_name_or_maker(name, maker):
    """A persona may be called as an assistant the templates correct a user about: its "mistaken"
    topic takes others, and every conversation passes the checks."""
    p = persona.Persona(name=name, maker=maker)
    about, questions, answers, _ = identity.topics(p)["mistaken"]
    for text in [about, *questions, *(answer.split(" not", 1)[1] for answer in answers if " not" in answer)]:
        assert name not in text and maker not in text and maker.split()[0] not in text, text
    rng = random.Random(0)
    table = identity.topics(p)
    for _ in range(200):
        messages, stated = identity.template_conversation(table, rng)
        assert persona.problem(messages, p, stated) is None, messages


def test_endpoint_answers_checked_retried_and_deduplicated(tmp_path, monkeypatch, capsys):
    """Two requests in flight; a 429 and a 500 are retried, a stall times out and is retried; of
    the answers, bad JSON, a contradiction and a repeat are refused, an answer in a ``` fence is read.
    Exactly the requests needed are made: 3 retried, 5 answers from the script, then 4 good ones."""
    out = tmp_path / "quill.jsonl"
    monkeypatch.setenv("QUILL_KEY", "sk-test")
    with scripted_endpoint("429", "500", "stall", "bad-json", "contradiction", "same", "same-shouted", "fenced") as server:
        assert identity.main([*endpoint_options(server, out, write_persona(tmp_path), 6), "--api-key-env", "QUILL_KEY"]) == 0
    err = capsys.readouterr().err
    rows = CustomJSON(path=str(out)).rows
    assert len(rows) == 6 and len({identity.key(messages) for messages in rows}) == 6
    assert conversation("again") in rows and rows.count(conversation("again")) == 1
    assert sorted(action for action, _, _ in server.requests) == sorted(
        ["429", "500", "stall", "bad-json", "contradiction", "same", "same-shouted", "fenced", *["good"] * 4])
    for _, body, auth in server.requests:
        assert auth == "Bearer sk-test" and body["model"] == "scripted"
        assert body["response_format"]["json_schema"]["schema"]["required"] == ["messages"]
        [message] = body["messages"]
        assert "Name: Quill" in message["content"] and "Made by: the Lantern Lab" in message["content"]
    assert len({body["messages"][0]["content"] for _, body, _ in server.requests}) >= 6  # varied prompts
    for said in ("refused 1 (bad JSON)", "refused 1 (contradiction), e.g. contradiction: made by 'OpenAI'",
                 "refused 1 (duplicate)", "HTTP 429; retry 1 of 6", "HTTP 500; retry", "timed out; retry"):
        assert said in err, said


def test_an_interrupted_run_continues_without_duplicates(tmp_path, capsys, monkeypatch):
    """Killed while it waits for its third answer, the command is run again: the file keeps its
    lines, a line cut by a kill is dropped, a repeat of a line already there is refused, and the run
    ends with the number asked for. The second endpoint refuses response_format (as nanochat serve):
    the generator asks again without it, and from then on never sends it; a 429's Retry-After (0 s)
    is waited instead of the backoff (here up to 1,000 s)."""
    out, persona_file = tmp_path / "quill.jsonl", write_persona(tmp_path)
    with scripted_endpoint("same", "good", "hang") as server:
        command = [sys.executable, "-m", "nanochat.cli", "identity", *endpoint_options(server, out, persona_file, 5, 1, 60)]
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OPENAI_API_KEY": ""})
        try:
            waiting.until(lambda: out.exists() and len(out.read_text().splitlines()) == 2 and len(server.requests) == 3,
                          60, "two conversations written, the third asked for", procs=[proc])
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        before = out.read_text()
        with out.open("a") as f:
            f.write('[{"role": "user", "content": "hello')  # a line cut in the middle
        server.refuse_format, server.script = True, ["429", "same"]
        sent = len(server.requests)
        assert all(auth is None for _, _, auth in server.requests)  # no key, no Authorization header
        monkeypatch.setenv("OPENAI_API_KEY", "sk-default")  # the variable read without --api-key-env
        assert identity.main([*endpoint_options(server, out, persona_file, 5, 1), "--retry-delay", "1000"]) == 0
    after = out.read_text()
    assert after.startswith(before) and len(CustomJSON(path=str(out)).rows) == 5
    assert len({identity.key(messages) for messages in lines(out)}) == 5
    second = server.requests[sent:]
    assert [action for action, _, _ in second] == ["refuse-format", "429", "same", "good", "good", "good"]
    assert {auth for _, _, auth in second} == {"Bearer sk-default"}
    assert "response_format" in second[0][1] and not any("response_format" in body for _, body, _ in second[1:])
    err = capsys.readouterr().err
    assert "dropping its unfinished last line" in err and "refuses response_format" in err
    assert "HTTP 429; retry 1 of 6 in 0.0 s" in err and "refused 1 (duplicate)" in err


@pytest.fixture(scope="module")
def quill_templates(tmp_path_factory):
    """Quill's conversations from the templates, written by the `nanochat identity` command."""
    directory = tmp_path_factory.mktemp("quill")
    out = directory / "quill.jsonl"
    done = waiting.run([sys.executable, "-m", "nanochat.cli", "identity", "--persona", str(write_persona(directory)),
                        "--out", str(out)], 60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert f"{out}: 100 conversations" in done.stderr
    return out


def test_templates_need_only_the_persona(quill_templates, tmp_path):
    rows = CustomJSON(path=str(quill_templates)).rows
    assert len(rows) == 100 and len({identity.key(messages) for messages in rows}) == 100
    quill = persona.load(write_persona(tmp_path))
    assert all(persona.problem(messages, quill) is None for messages in rows)
    text = " ".join(m["content"] for messages in rows for m in messages)
    assert all(value in text for value in [*QUILL["facts"].values(), QUILL["tone"], "English and Portuguese"])
    assert {len(messages) for messages in rows} == {2, 4, 6}
    assert len({messages[0]["content"] for messages in rows}) >= 30  # varied openings
    assert any(m["content"].isupper() for messages in rows for m in messages[::2])  # and user styles
    # run again asking for more: the file grows, what it held stays, nothing is there twice
    out = tmp_path / "more.jsonl"
    shutil.copy(quill_templates, out)
    assert identity.main(["--persona", str(tmp_path / "quill.json"), "--out", str(out), "--num", "130"]) == 0
    assert out.read_text().startswith(quill_templates.read_text())
    assert len({identity.key(messages) for messages in lines(out)}) == len(lines(out)) == 130


def test_make_speedrun_identity_reaches_the_flow():
    dry = subprocess.run(["make", "-n", "speedrun", "PRESET=cpu", "IDENTITY=my.jsonl"], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=60)
    assert f"--identity '{REPO / 'my.jsonl'}'" in dry.stdout  # absolute: the stages run elsewhere
    dry = subprocess.run(["make", "-n", "speedrun", "IDENTITY=s3://bucket/me.jsonl"], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=60)
    assert "--identity 's3://bucket/me.jsonl'" in dry.stdout
    dry = subprocess.run(["make", "-n", "speedrun"], cwd=REPO, capture_output=True, text=True, check=True, timeout=60)
    assert "--identity" not in dry.stdout


def test_a_tiny_model_trained_on_them_says_it_is_quill(quill_templates, tiny_base_run, tiny_env, tmp_path):
    """chat_sft from the 6-step base model (a run that skips mid_train), 60 steps at mid_train's
    learning rates on a mixture the identity conversations dominate (10 passes, a tenth of SmolTalk);
    then asked, greedily, "Who are you?" as `nanochat chat` asks. Measured with the templates'
    conversations of seeds 0 to 4: after 30 steps 1 of 3 answers named Quill, after 45 and 60 steps 5
    of 5 (60: a margin); at chat_sft's own rates, 2% of these, 30 steps taught it nothing."""
    run = tmp_path / "run"
    shutil.copytree(tiny_base_run, run)
    stage("nanochat.stages.chat_sft", run, tiny_env, "--from-stage", "base_train", "--identity", str(quill_templates),
          "--identity-weight", "10", "--smoltalk-weight", "0.1", "--gsm8k-weight", "0", "--spelling-size", "0",
          "--num-steps", "60", "--checkpoint-every", "60", "--matrix-lr", "0.02", "--embedding-lr", "0.2",
          "--unembedding-lr", "0.004")
    engine = load_engine(str(run), "sft", max_rows=1)
    answer = reply(engine, [{"role": "user", "content": "Who are you?"}], SamplingParams(temperature=0, max_tokens=20),
                   io.StringIO())  # what `nanochat chat -p "Who are you?" --temperature 0 --frequency-penalty 0` prints
    assert "Quill" in answer, answer
