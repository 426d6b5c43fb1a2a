"""ClimbMix as the pretraining source. The real shards cannot be reached here, so the test writes a
few in their real layout (shard_NNNNN.parquet with one string column `text` in row groups of 1024,
zstd, as upstream's dev/repackage_data_reference.py writes them), serves them from a real HTTP
server on 127.0.0.1 under the mirror's climbmix/ directory, and runs the download stage, the shard
listing and the pretraining loader over them; MMLU's auxiliary_train, which the GPU presets download
beside it for chat_sft, is written in its layout too."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset, shards, sources, stage, storage
from nanochat.dataloader import PretrainLoader, pretrain_loader
from nanochat.stages import download as download_stage
from nanochat.tokenizer import Tokenizer
from tasks.mmlu import MMLU
from tests.support.httpserver import serve
from tests.support.mirrors import task_mirror

CLIMBMIX = sources.CORPORA["climbmix"]
SHARDS = 4  # 0..2 train, 3 validation
DOCS = 1100  # two row groups of upstream's 1024 rows
MMLU_QUESTIONS = 12


@pytest.fixture(scope="module")
def mirror(shared_data, tmp_path_factory):
    """A mirror holding the ClimbMix shards and MMLU's auxiliary_train made here, and the shared eval
    bundle and task files (the download stage fetches them too)."""
    root = task_mirror(shared_data, tmp_path_factory.mktemp("climbmix-mirror"), mmlu_questions=MMLU_QUESTIONS)
    (root / CLIMBMIX.dir).mkdir()
    for i in range(SHARDS):
        docs = [f"document {j} of climbmix shard {i}." for j in range(DOCS)]
        pq.write_table(pa.table({"text": docs}), root / CLIMBMIX.relpath(i), row_group_size=1024,
                       use_dictionary=False, compression="zstd", compression_level=3, write_statistics=False)
    return root


def byte_tokenizer():
    return Tokenizer({bytes([i]): i for i in range(256)})


def text_of(batches):
    """The document bytes of a loader's batches (inputs only, special tokens left out)."""
    return b"".join(bytes(t for t in x.flatten().tolist() if t < 256) for x, _ in batches)


def test_the_registered_facts(monkeypatch):
    """Upstream's layout: karpathy/climbmix-400b-shuffle, shards 0..6542, the last one validation."""
    monkeypatch.delenv("NANOCHAT_DATA_MIRROR", raising=False)
    assert sources.pretrain_plan(170, None, "climbmix") == (list(range(170)), 6542)
    assert sources.pretrain_plan(-1, None, "climbmix") == (list(range(6542)), 6542)
    assert sources.url(sources.get("climbmix/shard_06542.parquet")) == \
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_06542.parquet"
    assert sources.get("climbmix/shard_00000.parquet").kind == "shard"  # checked for a `text` column
    with pytest.raises(sources.SourceError, match="unknown data file 'climbmix/shard_06543.parquet'"):
        sources.get("climbmix/shard_06543.parquet")
    assert sources.corpus() is sources.CORPORA["fineweb-edu"]  # the default, unchanged
    with pytest.raises(sources.SourceError, match=r"^unknown pretraining source 'fineweb'; known sources: climbmix, fineweb-edu$"):
        sources.corpus("fineweb")


def test_download_stage_and_the_run_read_climbmix_and_mmlu_train(mirror, tmp_path, monkeypatch):
    """As a GPU preset downloads: ClimbMix shards, and MMLU's auxiliary_train (--mmlu-train) for chat_sft."""
    store = str(tmp_path / "storage")
    run = storage.normalize(str(tmp_path / "run"))

    def download(*options):
        """The stage's main, as `run_main` calls it (test_download runs the stage's process)."""
        argv = ["--run", run, "--preset", "tiny", "--storage", store, *options]
        return download_stage.main(stage.parse_args(download_stage.build_parser(), download_stage.STAGE, argv))

    with pytest.raises(stage.StageError, match=r"^unknown pretraining source 'climb-mix'; known sources: climbmix, fineweb-edu$"):
        download("--source", "climb-mix", "--data-mirror", str(mirror))  # before any request

    with serve(mirror) as server:
        download("--source", "climbmix", "--mmlu-train", "--data-mirror", server.url)
    committed = json.loads((tmp_path / "run" / "download" / "stage.json").read_text())
    assert committed["config"]["source"] == "climbmix"  # in stage.json, so in every downstream key
    files = storage.read_json(committed["outputs"]["files"]["uri"])
    declared = sorted(r for r in files if sources.SHARD_RE.match(r))
    # the tiny preset's 2 training shards and the mirror's last shard, in the corpus's own directory
    assert declared == [CLIMBMIX.relpath(i) for i in (0, 1, 3)]
    assert all(files[r]["url"] == f"{server.url}/{r}" for r in declared)
    uris = [files[r]["uri"] for r in declared]

    # on its own (no declared data), a stage lists the cache's climbmix/ directory; fineweb-edu's is apart
    assert dataset.shard_split("val", store, "climbmix") == uris[2:]
    with pytest.raises(shards.ShardError, match="no shard_NNNNN.parquet files in .*/data/pretrain"):
        dataset.shard_split("train", store)

    # in the run, a stage reads the declared shards: the pretraining loader as base_train builds it
    monkeypatch.setattr(stage, "_declared", None)  # restored after the test
    stage.declare_data(run)
    assert dataset.pretrain_shards(-1) == dataset.pretrain_shards(-1, source="climbmix") == (uris[:2], uris[2])
    assert dataset.shard_split("train") == uris[:2]
    mmlu_train = MMLU("auxiliary_train")
    assert mmlu_train.uri == files[sources.GROUPS["mmlu_train"][0]]["uri"] and len(mmlu_train) == MMLU_QUESTIONS
    with pytest.raises(stage.StageError, match="the run's download fetched climbmix shards .*, not fineweb-edu"):
        dataset.pretrain_shards(-1, source="fineweb-edu")
    val = text_of(pretrain_loader(byte_tokenizer(), 4, 64, "val", storage_uri=store))
    assert b"of climbmix shard 3." in val and b"shard 0" not in val
    assert b"of climbmix shard 0." in text_of([next(pretrain_loader(byte_tokenizer(), 4, 64, "train", storage_uri=store))])

    fineweb = sources.CORPORA["fineweb-edu"].relpath(0)  # a files.json naming shards of both corpora
    monkeypatch.setattr(stage, "_declared", stage.DeclaredData(committed["outputs"]["files"], {**files, fineweb: files[declared[0]]}))
    with pytest.raises(stage.StageError, match="declares shards of climbmix and fineweb-edu; a run pretrains on one source"):
        dataset.pretrain_shards(-1)


def test_training_starts_on_the_first_climbmix_shards(mirror, tmp_path):
    """On its own, a stage plans the shards from a mirror that lists nothing (HEAD probes of
    climbmix/shard_NNNNN.parquet) and its loader fetches each shard when it gets there."""
    store = str(tmp_path / "storage")
    with serve(mirror, listings=False) as server:
        assert sources.pretrain_plan(-1, server.url, "climbmix") == ([0, 1, 2], 3)
        train, val = dataset.pretrain_shards(2, store, server.url, "climbmix")
        assert [train, val] == [[dataset.Downloader(store).cache_uri(CLIMBMIX.relpath(i)) for i in (0, 1)],
                                dataset.Downloader(store).cache_uri(CLIMBMIX.relpath(3))]
        loader = PretrainLoader(byte_tokenizer(), 4, 64, train,
                                wait_for_shard=dataset.shard_waiter(store, server.url, "climbmix"))
        assert b"of climbmix shard 0." in text_of([next(loader)])
        assert storage.exists(train[0]) and not storage.exists(train[1])
        assert server.gets("/" + CLIMBMIX.relpath(0)) == [(None, 200, (mirror / CLIMBMIX.relpath(0)).stat().st_size)]
        assert server.gets("/" + CLIMBMIX.relpath(1)) == []
