"""Tasks on the real datasets: sizes, rendering, evaluators against the datasets' own answers,
determinism of slicing/shuffling/mixtures, and errors that name the bad file and row."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tasks.common
from nanochat.tokenizer import Tokenizer, assistant_parts, normalize_messages
from tasks import catalog
from tasks.arc import ARC
from tasks.common import LETTERS, Task, TaskDataError
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval, build_program, extract_code
from tasks.mixtures import TaskMixture, TaskSequence
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SpellingBee

GSM8K_TRAIN = "hf/openai/gsm8k/main/train-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def task_storage(tmp_path_factory):
    """The storage root whose data cache this module's tests share (each file is fetched once)."""
    return tmp_path_factory.mktemp("storage")


@pytest.fixture
def data(shared_data, task_storage, monkeypatch):
    """Tasks read the real files through the registry, with the shared folder as the mirror and a
    data cache that starts empty; the environment is the test's only (a session-wide one would be
    every later test's too)."""
    monkeypatch.setenv("NANOCHAT_DATA_MIRROR", f"file://{shared_data}")
    monkeypatch.setenv("NANOCHAT_STORAGE", str(task_storage))
    return shared_data


def raw_rows(data, relpath):
    return pq.read_table(data / relpath).to_pylist()


class Numbers(Task):
    """A synthetic task: example i is {"i": i}."""

    eval_type = "generative"

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def num_examples(self):
        return self.n

    def get_example(self, index):
        assert 0 <= index < self.n
        return {"messages": [{"role": "user", "content": str(index)}, {"role": "assistant", "content": "ok"}], "i": index}


def ids(task):
    return [c["i"] for c in task]


# sizes

@pytest.mark.parametrize("make, expected", [
    (lambda: ARC("ARC-Easy"), 2376),
    (lambda: ARC("ARC-Challenge"), 1172),
    (lambda: MMLU("dev"), 285),
    (lambda: MMLU("validation"), 1542),  # data/README.md says 1,540; the file holds 1,542 rows
    (lambda: MMLU("test"), 14079),
    (lambda: GSM8K("train"), 7473),
    (lambda: GSM8K("test"), 1319),
    (lambda: HumanEval(), 164),
    (lambda: SmolTalk("train"), 1828),
    (lambda: SmolTalk("test"), 200),
    (lambda: CustomJSON(), 91),
])
def test_sizes(data, make, expected):
    task = make()
    assert len(task) == task.num_examples() == expected
    assert task.skipped == []
    for i in (0, expected // 2, expected - 1):
        normalize_messages(task[i])


def test_word_list_and_mmlu_subjects(data):
    bee = SpellingBee(size=5)
    assert len(bee.rows) == 63875
    assert len(bee.words) + len(SpellingBee(split="test").words) == 63875
    assert len({c["subject"] for c in MMLU("test")}) == 57


def test_loading_is_lazy(monkeypatch):
    def no_access(relpath):
        raise AssertionError(f"read {relpath} before first access")

    monkeypatch.setattr(tasks.common, "data_file", no_access)
    made = [ARC(), MMLU(), GSM8K(), HumanEval(), SmolTalk(), CustomJSON(), SpellingBee(),
            TaskMixture([GSM8K(), SmolTalk()])]
    assert len(made[-2]) == 1000  # SpellingBee's size needs no data
    with pytest.raises(AssertionError, match="gsm8k/main/train"):
        len(made[2])


# GSM8K

def test_gsm8k_parts_reassemble_every_train_answer(data):
    task, rows = GSM8K("train"), raw_rows(data, GSM8K_TRAIN)
    assert len(task) == len(rows)
    n_calls = 0
    for conversation, row in zip(task, rows):
        messages = normalize_messages(conversation)
        assert messages[0]["content"] == row["question"]
        parts = assistant_parts(messages[1]["content"])
        text = ""
        for j, part in enumerate(parts):
            if part["type"] == "python":
                assert parts[j + 1]["type"] == "python_output"
                text += f"<<{part['text']}={parts[j + 1]['text']}>>"
                n_calls += 1
            elif part["type"] == "text":
                assert "<<" not in part["text"] and ">>" not in part["text"]
                text += part["text"]
        assert text == row["answer"]
    assert n_calls > 20000


def test_gsm8k_tool_output_is_never_trained(data):
    tok = Tokenizer({bytes([b]): b for b in range(256)})  # byte-level: every text is representable
    conversation = GSM8K("train")[0]
    ids, mask = tok.render_conversation(conversation)
    out_start, out_end = tok.encode_special("<|output_start|>"), tok.encode_special("<|output_end|>")
    inside = False
    for token, m in zip(ids, mask):
        inside = (inside or token == out_start) and token != out_end
        if inside:
            assert m == 0
    assert tok.decode([t for t, m in zip(ids, mask) if m]).endswith("#### 72<|assistant_end|>")


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_evaluate_against_the_dataset(data, split):
    task = GSM8K(split)
    rows = raw_rows(data, f"hf/openai/gsm8k/main/{split}-00000-of-00001.parquet")
    for conversation, row in zip(task, rows):
        final = row["answer"].rsplit("####", 1)[1].strip()
        assert task.evaluate(conversation, row["answer"])
        assert task.reward(conversation, f"So the answer is\n#### {final}") == 1.0
        wrong = str(int(final.replace(",", "")) + 1)
        assert not task.evaluate(conversation, row["answer"].replace(f"#### {final}", f"#### {wrong}"))
        assert task.reward(conversation, f"#### {wrong}") == 0.0
        assert task.reward(conversation, final) == 0.0  # no answer marker: no reward


def test_gsm8k_number_normalisation(data):
    task = GSM8K("test")
    conversation = next(c for c in task if c["messages"][1]["content"][-1]["text"].endswith("#### 1000"))
    for good in ["#### 1,000", "#### 1000.00", "#### $1,000", "#### 1000 dollars", "####1000", "#### 1000\n#### 5"]:
        assert task.evaluate(conversation, good), good
    for bad in ["#### 100", "#### -1000", "#### ", "1000", "#### 10,001", "#### 5\n#### 1000"]:  # the first #### counts
        assert not task.evaluate(conversation, bad), bad


# multiple choice

def test_arc_evaluate_gold_letter_only(data):
    for subset in ("ARC-Easy", "ARC-Challenge"):
        rows = raw_rows(data, f"hf/allenai/ai2_arc/{subset}/test-00000-of-00001.parquet")
        task = ARC(subset)
        for conversation, row in zip(task, rows):
            gold = LETTERS[row["choices"]["label"].index(row["answerKey"])]
            assert conversation["letters"] == list(LETTERS[: len(row["choices"]["text"])])
            prompt = conversation["messages"][0]["content"]
            assert row["question"] in prompt and all(f"- {t}=" in prompt for t in row["choices"]["text"])
            for letter in conversation["letters"]:
                assert task.evaluate(conversation, letter) == (letter == gold)
            assert task.evaluate(conversation, f" {gold}\n") and not task.evaluate(conversation, gold + gold)


def test_mmlu_evaluate_gold_letter_only(data):
    rows = raw_rows(data, "hf/cais/mmlu/all/test-00000-of-00001.parquet")
    task = MMLU("test")
    for conversation, row in zip(task, rows):
        assert conversation["letters"] == ["A", "B", "C", "D"]
        assert conversation["subject"] == row["subject"]
        for k, letter in enumerate("ABCD"):
            assert task.evaluate(conversation, letter) == (k == row["answer"])


# SpellingBee

def test_spellingbee_python_and_answers(data):
    task = SpellingBee(size=1000)
    kinds, prompts = {"spell": 0, "count": 0}, set()
    for conversation in task:
        normalize_messages(conversation)
        word, answer, kind = conversation["word"], conversation["answer"], conversation["kind"]
        kinds[kind] += 1
        prompts.add(conversation["messages"][0]["content"].replace(word, "W").replace(word.capitalize(), "W"))
        content = conversation["messages"][1]["content"]
        parts = assistant_parts(content)
        full = "".join(p["text"] for p in parts)
        if kind == "count":
            letter = conversation["letter"]
            (call,) = [p["text"] for p in parts if p["type"] == "python"]
            (output,) = [p["text"] for p in parts if p["type"] == "python_output"]
            assert eval(call, {"__builtins__": {}}) == int(output) == int(answer) == word.count(letter)
            assert not task.evaluate(conversation, f"#### {int(answer) + 1}")
        else:
            assert answer == "-".join(word)
            assert not task.evaluate(conversation, f"#### {answer}-s")
        assert full.endswith(f"#### {answer}")
        assert task.evaluate(conversation, full) and task.evaluate(conversation, f"#### {answer.upper()}")
        assert not task.evaluate(conversation, answer)  # no answer marker
    assert min(kinds.values()) > 350
    assert len(prompts) > 30  # varied phrasings (templates x quoting x case)


def test_spellingbee_deterministic_per_index(data):
    a, b = SpellingBee(size=200), SpellingBee(size=200)
    assert [a[i] for i in range(200)] == [b[i] for i in reversed(range(200))][::-1]  # order-free
    assert a[0]["word"] == "famed"  # the same on every machine and run (string seeds, no hash())
    test_words = {c["word"] for c in SpellingBee(size=500, split="test")}
    assert not test_words & set(a.words)
    assert [c["kind"] for c in SpellingBee(size=20, kinds=["count"])] == ["count"] * 20


# slicing, shuffling, mixtures

@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 60), start=st.integers(0, 70), extra=st.none() | st.integers(0, 70),
       step=st.integers(1, 7), seed=st.none() | st.integers(0, 3))
def test_slicing_matches_python_slices(n, start, extra, step, seed):
    stop = None if extra is None else start + extra
    task = Numbers(n, start=start, stop=stop, step=step, seed=seed)
    base = ids(Numbers(n, seed=seed))
    assert ids(task) == base[start:stop:step]
    assert sorted(base) == list(range(n))
    if len(task):
        assert task[-1] == task[len(task) - 1]
    with pytest.raises(IndexError):
        task[len(task)]


def test_shuffling_is_seeded(data):
    assert ids(Numbers(100, seed=1)) == ids(Numbers(100, seed=1))
    assert ids(Numbers(100, seed=1)) != ids(Numbers(100, seed=2))
    assert ids(Numbers(100, seed=1)) != list(range(100))
    a, b = ARC("ARC-Easy", stop=50, seed=7), ARC("ARC-Easy", stop=50, seed=7)
    assert list(a) == list(b) and len(a) == 50
    assert list(a) != list(ARC("ARC-Easy", stop=50, seed=8))
    assert list(ARC("ARC-Easy", start=10, stop=40, step=3)) == [ARC("ARC-Easy")[i] for i in range(10, 40, 3)]


@pytest.mark.parametrize("bad", [dict(start=-1), dict(start=5, stop=2), dict(step=0), dict(seed="x")])
def test_bad_slices_are_refused_with_a_message(bad):
    with pytest.raises(AssertionError, match="must be"):
        Numbers(10, **bad)


def test_sequence_and_mixture(data):
    a, b = Numbers(30), Numbers(7, start=2, step=2)  # b's view: 2, 4, 6
    seq = TaskSequence([a, b])
    assert ids(seq) == list(range(30)) + [2, 4, 6]
    assert seq.eval_type == "generative"

    mix = TaskMixture([a, b], seed=1)
    assert ids(mix) == ids(TaskMixture([a, b], seed=1))
    assert ids(mix) != ids(TaskMixture([a, b], seed=2))
    assert sorted(ids(mix)) == sorted(ids(seq))
    assert ids(mix) != ids(seq)  # interleaved, not concatenated

    c = Numbers(40, start=30, stop=33)  # 30, 31, 32
    got = ids(TaskMixture([a, c], weights=[0.5, 3], seed=1))
    from_a = [i for i in got if i < 30]
    assert len(from_a) == len(set(from_a)) == 15  # a fixed random half of a
    other_seed = [i for i in ids(TaskMixture([a, c], weights=[0.5, 3], seed=2)) if i < 30]
    assert sorted(from_a) not in (list(range(15)), sorted(other_seed))  # a random half, the seed's: not the first
    assert sorted(i for i in got if i >= 30) == [30] * 3 + [31] * 3 + [32] * 3
    assert got == ids(TaskMixture([a, c], weights=[0.5, 3], seed=1))
    assert sorted(ids(TaskMixture([a, c, c], seed=4))) == sorted(ids(TaskMixture([a, c], weights=[1, 2], seed=4)))

    real = TaskMixture([GSM8K("test", stop=40), ARC("ARC-Easy", stop=20), SpellingBee(size=10)], seed=5)
    assert len(real) == 70 and real.eval_type is None
    assert [json.dumps(c, sort_keys=True) for c in real] == [json.dumps(c, sort_keys=True) for c in TaskMixture(
        [GSM8K("test", stop=40), ARC("ARC-Easy", stop=20), SpellingBee(size=10)], seed=5)]


# bad inputs

def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])


def test_customjson_bad_lines_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "convs.jsonl", [
        GOOD,
        json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),  # line 2
        "{not json",  # line 3
        "",
        GOOD,
        json.dumps({"messages": [{"role": "system", "content": "be brief"}, *json.loads(GOOD)]}),
    ])
    with pytest.raises(TaskDataError, match=r"convs\.jsonl: line 2: .*role 'user', expected 'assistant'"):
        len(CustomJSON(path))
    task = CustomJSON(path, on_error="skip")
    assert len(task) == 3
    assert [s.split(": ")[1] for s in task.skipped] == ["line 2", "line 3"]
    assert "not valid JSON" in task.skipped[1] and "convs.jsonl" in task.skipped[1]
    assert task[2]["messages"][0]["role"] == "system"


def test_parquet_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "gsm.parquet"
    pq.write_table(pa.table({"question": ["q"]}), path)
    for on_error in ("raise", "skip"):  # a missing column is never a row to skip
        with pytest.raises(TaskDataError, match=r"gsm\.parquet: missing column\(s\) \['answer'\]"):
            len(GSM8K(path=str(path), on_error=on_error))


def test_parquet_bad_rows_name_file_and_row(tmp_path):
    path = tmp_path / "mmlu.parquet"
    pq.write_table(pa.table({
        "question": ["q0", "q1", None, "q3"],
        "subject": ["s"] * 4,
        "choices": [["a", "b", "c", "d"]] * 4,
        "answer": [0, 4, 1, 3],
    }), path)
    with pytest.raises(TaskDataError, match=r"mmlu\.parquet: row 1: answer must be an int in 0-3, got 4"):
        len(MMLU(path=str(path)))
    task = MMLU(path=str(path), on_error="skip")
    assert len(task) == 2 and len(task.skipped) == 2
    assert "row 2: field 'question'" in task.skipped[1]
    assert task[1]["messages"][1]["content"] == "D"

    aux = tmp_path / "aux.parquet"  # upstream auxiliary_train wraps each row in a `train` struct
    pq.write_table(pa.table({"train": [{"question": "q", "subject": "", "choices": ["a", "b", "c", "d"], "answer": 2},
                                       None]}), aux)
    task = MMLU("auxiliary_train", path=str(aux), on_error="skip")
    assert task.relpath == "hf/cais/mmlu/auxiliary_train/train-00000-of-00001.parquet"
    assert len(task) == 1 and task[0]["messages"][1]["content"] == "C" and "row 1" in task.skipped[0]

    gsm = tmp_path / "gsm.parquet"
    pq.write_table(pa.table({"question": ["q", "q"], "answer": ["x <<2*3=6>>6\n#### 6", "no marker"]}), gsm)
    with pytest.raises(TaskDataError, match=r"gsm\.parquet: row 1: answer does not end with '#### <number>'"):
        len(GSM8K(path=str(gsm)))

    arc = tmp_path / "arc.parquet"
    choices = {"text": ["x", "y"], "label": ["A", "B"]}
    pq.write_table(pa.table({"id": ["0"], "question": ["q"], "choices": [choices], "answerKey": ["C"]}), arc)
    with pytest.raises(TaskDataError, match=r"arc\.parquet: row 0: answerKey 'C' is not one of the labels"):
        len(ARC(path=str(arc)))
    with pytest.raises(TaskDataError, match=r"arc\.parquet: every one of 1 records is bad; the first: .*row 0"):
        len(ARC(path=str(arc), on_error="skip"))  # all bad: the wrong file, not rows to skip
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(TaskDataError, match=r"junk\.parquet: not a readable parquet file"):
        len(ARC(path=str(tmp_path / "junk.parquet")))


def test_smoltalk_bad_conversations(tmp_path):
    path = tmp_path / "smol.parquet"
    ok = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.table({
        "messages": [ok, [{"role": "assistant", "content": "a"}], [{"role": "system", "content": "s"}, *ok], ok[:1]],
        "source": ["x"] * 4,
    }), path)
    with pytest.raises(TaskDataError, match=r"smol\.parquet: row 1: invalid conversation: message 0: role 'assistant'"):
        len(SmolTalk(path=str(path)))
    task = SmolTalk(path=str(path), on_error="skip")
    assert len(task) == 2 and [s.split(": ")[1] for s in task.skipped] == ["row 1", "row 3"]


def test_smoltalk_max_chars_leaves_out_longer_conversations(data):
    def chars(conversation):
        return sum(len(m["content"]) for m in conversation["messages"])

    every = SmolTalk("train")
    lengths = sorted(chars(c) for c in every)
    limit = lengths[len(lengths) // 2]
    short = SmolTalk("train", max_chars=limit)
    # the oracle: the full split, filtered here
    assert [c["messages"] for c in short] == [c["messages"] for c in every if chars(c) <= limit]
    assert len(short) == sum(n <= limit for n in lengths) and short.skipped == []


def test_bad_word_list_names_the_line(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("apple\nbanana\nNot a word\n")
    with pytest.raises(TaskDataError, match=r"words\.txt: line 3: expected one lowercase word"):
        SpellingBee(size=3, path=str(path))[0]
    assert SpellingBee(size=3, path=str(path), on_error="skip").rows == ["apple", "banana"]


# HumanEval

def test_humaneval_prompt_and_code_extraction(data):
    task = HumanEval()
    rows = raw_rows(data, "hf/openai/openai_humaneval/openai_humaneval/test-00000-of-00001.parquet")
    for conversation, row in zip(task, rows):
        assert conversation["messages"][0]["content"] == row["prompt"]
        assert conversation["entry_point"] == row["entry_point"] and conversation["test"] == row["test"]
    conversation = task[0]
    body = rows[0]["canonical_solution"]
    full = rows[0]["prompt"] + body
    assert extract_code(f"Here you go:\n```python\n{full}```\nDone.") == full
    assert extract_code(f"```py\n{full}") == full  # unclosed fence: to the end
    assert extract_code(full) == full
    # a bare body continues the prompt; a full function gets the prompt's imports
    assert build_program(conversation, body).startswith(rows[0]["prompt"] + body)
    program = build_program(conversation, f"```python\n{full.split('from typing import List')[1]}```")
    assert program.startswith("from typing import List\n") and program.endswith("check(has_close_elements)\n")


def test_humaneval_programs_pass_with_the_canonical_solution(data, tmp_path):
    """The oracle: the dataset's own solution passes its tests and a wrong one fails (plain
    subprocess here; the sandbox is nanochat.execution's job)."""
    task = HumanEval()
    rows = raw_rows(data, "hf/openai/openai_humaneval/openai_humaneval/test-00000-of-00001.parquet")
    programs = [[build_program(c, r["prompt"] + r["canonical_solution"]), build_program(c, "    return None\n")]
                for c, r in zip(task, rows)]
    (tmp_path / "programs.json").write_text(json.dumps(programs))
    runner = (
        "import json, sys\n"
        "out = []\n"
        "for good, bad in json.load(open(sys.argv[1])):\n"
        "    res = []\n"
        "    for p in (good, bad):\n"
        "        try:\n"
        "            exec(p, {'__name__': '__check__'}); res.append(True)\n"
        "        except BaseException:\n"
        "            res.append(False)\n"
        "    out.append(res)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", runner, str(tmp_path / "programs.json")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    results = json.loads(proc.stdout.splitlines()[-1])
    assert all(good for good, _ in results)
    assert sum(bad for _, bad in results) <= 3  # `return None` happens to pass very few tests


def test_humaneval_evaluate_in_the_sandbox(data):
    task = HumanEval(stop=5)
    for conversation in task:
        assert task.evaluate(conversation, conversation["messages"][1]["content"])
        assert not task.evaluate(conversation, "    return None\n")


def test_catalog_resolves_names_and_module_class():
    assert catalog.task_class("GSM8K", {"GSM8K": GSM8K}) is GSM8K
    assert catalog.task_class("tasks.arc:ARC") is ARC
    for spec, reason in [("nosuch:Task", "No module named 'nosuch'"), ("tasks.arc:Nope", "Nope"),
                         ("Jeopardy", "names no task; use GSM8K, module:Class"), (":ARC", "names no task")]:
        with pytest.raises(catalog.UnknownTask, match=reason):
            catalog.task_class(spec, {"GSM8K": GSM8K})
    assert catalog.EVAL_TASKS.keys() == catalog.BASELINES.keys()
