"""Your own pretraining text: download --source given a folder of parquet files with a `text`
column declares them where they are, and the run's tokenizer and base model train on them and on
nothing else; a folder that cannot serve is refused naming the file or the folder."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset, report, sources, stage, storage
from nanochat.dataloader import pretrain_loader
from nanochat.stages import download as download_stage
from nanochat.tokenizer import Tokenizer
from tests.support.stagerun import stage as run_stage

# two training files and the validation file (the last in name order), each with words of its own
TEXTS = {"a.parquet": "alpha apricot", "b.parquet": "bravo banana", "c.parquet": "charlie cherry"}


def write_texts(folder):
    """The folder's documents by file: 60 a file, about 3,000 characters."""
    folder.mkdir()
    docs = {}
    for name, words in TEXTS.items():
        docs[name] = [f"Document {i}: {words} {words} number {i}." for i in range(60)]
        pq.write_table(pa.table({"text": docs[name]}), folder / name, row_group_size=20)
    (folder / "README.txt").write_text("not a parquet file: left out")
    return docs


def write_files(folder, validation, **options):
    """Two training files of good text (as many as the tiny preset asks for), and `validation` as the
    validation file."""
    for name in "ab":
        pq.write_table(pa.table({"text": ["some text"]}), folder / f"{name}.parquet")
    pq.write_table(validation, folder / "c.parquet", **options)


def download(run, source, shared_data, store, *options):
    """The download stage's main, as `run_main` calls it."""
    argv = ["--run", str(run), "--preset", "tiny", "--storage", store, "--data-mirror", str(shared_data),
            "--source", source, *options]
    return download_stage.main(stage.parse_args(download_stage.build_parser(), download_stage.STAGE, argv))


def summary(run, name):
    return json.loads((run / name / "stage.json").read_text())


def test_the_run_trains_on_your_text(tmp_path, shared_data, tiny_env, monkeypatch):
    docs = write_texts(tmp_path / "texts")
    run = tmp_path / "run"
    download(run, f"{tmp_path}/texts/", shared_data, tiny_env["NANOCHAT_STORAGE"])
    files = storage.read_json(summary(run, "download")["outputs"]["files"]["uri"])
    own = {r: e for r, e in files.items() if r.startswith("own/")}
    assert {r: e["uri"] for r, e in own.items()} == {f"own/{n}": storage.normalize(str(tmp_path / "texts" / n)) for n in TEXTS}
    assert all(e["sha256"] == storage.sha256(e["uri"]) for e in own.values())  # declared where they are, hashed
    assert not any(r.startswith(("pretrain/", "climbmix/")) for r in files)  # no corpus fetched
    assert summary(run, "download")["metrics"]["train_shards"] == 2
    assert f"- pretraining text: {tmp_path}/texts/, 2 training shards + validation\n" in report.build(str(run))

    run_stage("nanochat.stages.tok_train", run, tiny_env, "--vocab-size", "300")
    run_stage("nanochat.stages.base_train", run, tiny_env, "--num-steps", "2", "--eval-every", "-1",
              "--checkpoint-every", "-1")

    def data_inputs(name):
        inputs = summary(run, name)["inputs"]
        return {r: inputs[r]["uri"] for r in inputs if r.startswith("own/")}

    # the tokenizer trained on every document of the training files, and on nothing else
    tokenizer_metrics = summary(run, "tok_train")["metrics"]
    train_docs = docs["a.parquet"] + docs["b.parquet"]
    assert (tokenizer_metrics["docs"], tokenizer_metrics["chars"]) == (len(train_docs), sum(map(len, train_docs)))
    assert data_inputs("tok_train") == {r: own[r]["uri"] for r in ("own/a.parquet", "own/b.parquet")}
    # base_train read the three files, and the loader it builds in the run yields their text
    assert data_inputs("base_train") == {r: e["uri"] for r, e in own.items()}
    tokenizer = Tokenizer.load(summary(run, "tok_train")["outputs"]["tokenizer"]["uri"].rsplit("/", 1)[0])
    monkeypatch.setattr(stage, "_declared", None)  # restored after the test
    stage.declare_data(str(run))
    train = tokenizer.decode(next(pretrain_loader(tokenizer, 4, 128, "train"))[0].flatten().tolist())
    val = tokenizer.decode([t for x, _ in pretrain_loader(tokenizer, 4, 128, "val") for t in x.flatten().tolist()])
    assert "alpha apricot" in train and "charlie" not in train
    assert "charlie cherry" in val and not {"alpha", "bravo"} & set(val.split())
    # more training files than the run declared: there is nothing more to download
    with pytest.raises(stage.StageError, match=r"3 training shards wanted, but .*files.json declares 2; "
                                               r"ask for fewer \(--num-shards; -1: all\)$"):
        dataset.pretrain_shards(3)


@pytest.mark.parametrize("make, error", [
    (lambda folder: None, "your text {folder} has 0 .parquet file(s); need at least 2 (train + validation)"),
    (lambda folder: folder.rmdir(), "your text {folder}: no such folder"),  # (it said 0 .parquet files)
    (lambda folder: [pq.write_table(pa.table({"body": ["x"]}), folder / f"{n}.parquet") for n in "abc"],
     "{folder}/a.parquet: no 'text' column (columns: body)"),
    (lambda folder: [pq.write_table(pa.table({"text": [1]}), folder / f"{n}.parquet") for n in "abc"],
     "{folder}/a.parquet: column 'text' has type int64, expected string"),
    (lambda folder: write_files(folder, pa.table({"text": pa.array([], pa.string())})), "{folder}/c.parquet: no rows"),
    (lambda folder: write_files(folder, pa.table({"text": ["", " \n\t"]})),
     "{folder}/c.parquet: no text (2 rows, all empty or white space)"),
    (lambda folder: write_files(folder, pa.table({"text": pa.array([b"ok", b"\xff ok"]).view(pa.string())})),
     "{folder}/c.parquet: row group 0: 'text' is not valid UTF-8 (In chunk 0: Invalid: Invalid UTF8 sequence at string index 1)"),
    (lambda folder: write_files(folder, pa.table({"text": ["x", "y", None]}), row_group_size=2),
     "{folder}/c.parquet: row group 1, row 0: 'text' is null"),
    (lambda folder: [pq.write_table(pa.table({"text": ["x"]}), folder / f"{n}.parquet") for n in "ab"],  # the preset's -n 2
     "your text {folder} has 1 training file(s) besides the validation file, fewer than the 2 asked for (-n); add files, or "
     "take them all: -n -1 here, and --num-shards -1 for base_train and base_eval"),
])
def test_a_folder_that_cannot_serve_is_refused_naming_it(tmp_path, shared_data, make, error):
    folder = tmp_path / "texts"
    folder.mkdir()
    make(folder)
    with pytest.raises(stage.StageError, match="^" + re.escape(error.format(folder=storage.normalize(str(folder)))) + "$"):
        download(tmp_path / "run", f"{folder}/", shared_data, str(tmp_path / "storage"))
    assert not (tmp_path / "storage").exists()  # refused before anything was fetched


def test_a_folder_in_a_bucket_is_planned_as_a_local_one(s3_root, tmp_path):
    """own_text_plan on an object store: a prefix holding the files is a folder (one holding none is
    "no such folder", as a path that does not exist)."""
    write_files(tmp_path, pa.table({"text": ["x"]}))
    for path in sorted(tmp_path.glob("*.parquet")):
        storage.write_bytes(f"{s3_root}/texts/{path.name}", path.read_bytes())
    train, val = sources.own_text_plan(f"{s3_root}/texts/", -1)
    assert train == [f"{s3_root}/texts/a.parquet", f"{s3_root}/texts/b.parquet"] and val == f"{s3_root}/texts/c.parquet"
    with pytest.raises(sources.SourceError, match=f"^your text {s3_root}/nothing: no such folder$"):
        sources.own_text_plan(f"{s3_root}/nothing/", -1)


def test_min_chars_declares_only_the_first_files_that_hold_that_much(tmp_path, shared_data):
    """--min-chars with your own text: the first training files that hold that many characters (a's
    alone, then a and b), with the validation file; the files left out are never read."""
    docs = write_texts(tmp_path / "texts")
    store = str(tmp_path / "storage")
    for min_chars, declared in ((1, "ac"), (sum(map(len, docs["a.parquet"])) + 1, "abc")):
        run = tmp_path / f"run-{min_chars}"
        download(run, f"{tmp_path}/texts/", shared_data, store, "--min-chars", str(min_chars))
        files = storage.read_json(summary(run, "download")["outputs"]["files"]["uri"])
        assert sorted(r for r in files if r.startswith("own/")) == [f"own/{n}.parquet" for n in declared]
    (tmp_path / "texts" / "b.parquet").write_bytes(b"not parquet")  # were it read, the stage would refuse it
    download(tmp_path / "run-again", f"{tmp_path}/texts/", shared_data, store, "--min-chars", "1")
