"""Registry of the real data sources, and the one mirror setting that can stand in for all of them.

Every file the pipeline downloads is a `Source`: a relative path, which is both its path in the data
cache (`<storage>/data/<relpath>`) and its path in a mirror (the layout of ../shared/data), plus its
real upstream URL and, optionally, a pinned size and sha256:

    pretrain/shard_NNNNN.parquet   FineWeb-EDU: karpathy/fineweb-edu-100b-shuffle on Hugging Face, shards 0..1822
    climbmix/shard_NNNNN.parquet   ClimbMix: karpathy/climbmix-400b-shuffle on Hugging Face, shards 0..6542
    eval_bundle.zip                nanochat's CORE eval bundle
    identity_conversations.jsonl   nanochat's synthetic identity conversations
    words/words_alpha.txt          dwyl/english-words
    hf/<org>/<dataset>/<path>      https://huggingface.co/datasets/<org>/<dataset>/resolve/main/<path>

Pretraining corpora. A run pretrains on one `Corpus`, chosen by name (`--source`, default
fineweb-edu). Both are upstream nanochat's repackagings (its dev/repackage_data_reference.py):
documents shuffled into `shard_NNNNN.parquet` files at the dataset's root, about 250M characters
each, one document per row in a string column `text` (ClimbMix's are decoded from the GPT-2 tokens
of nvidia/Nemotron-ClimbMix), row groups of 1024 rows. Each corpus has a directory of its own in
the cache and in a mirror, so the two never mix; FineWeb-EDU keeps `pretrain/`, where it always was.

`NANOCHAT_DATA_MIRROR` (or a stage's `--data-mirror`) maps every source onto `<mirror>/<relpath>`;
the mirror is anything fsspec opens: a path, file://, http(s)://, s3://. No size or sha256 is
pinned yet: they cannot be checked offline, and the files of ../shared/data are stand-ins, not
byte copies. Pin them per source where a byte-exact upstream matters; the downloader checks both.

Which shard is validation. By convention the last shard is the validation split, and
`shards.list_shards` applied to the cache directory keeps that meaning, so the validation shard
must be the highest-numbered file there. A corpus therefore has a shard set: upstream it is known
from the registry (0..1822, 0..6542); a mirror is asked (fsspec `ls` of `<mirror>/<corpus dir>/`,
or, when an HTTP server lists nothing, a HEAD probe of `shard_NNNNN.parquet`). `pretrain_plan(n)`
takes the first n shards of that set for training plus the set's last shard for validation: `-n 8`
fetches 0..7 + 1822 of FineWeb-EDU upstream and 0..7 + 23 from ../shared/data. The validation
shard sorts last in the cache whatever n is, and the downloader fetches it before any training
shard, so "last = validation" also holds at every moment of a download running in the background.

Your own text. A `--source` with a "/" (a path or URI) instead of a corpus name is a folder of your
own `.parquet` files with a string column `text`, one document per row: `own_text_plan` takes the
files directly in it in name order, the last one validation, and the download stage declares them
in the run where they are (never copied into the cache, where two runs' folders would collide)
under `own/<file name>`; from there the run's stages read them as they read a corpus's shards.
"""

import dataclasses
import os
import re
import urllib.error
import urllib.request

from nanochat import storage
from nanochat.common import InputError

HF = "https://huggingface.co/datasets"
KARPATHY_S3 = "https://karpathy-public.s3.us-west-2.amazonaws.com"
EVAL_BUNDLE = "eval_bundle.zip"


class SourceError(InputError, ValueError):
    """An unknown data file, or a mirror that cannot serve the sources; the message names it."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A pretraining corpus: shard_00000.parquet .. shard_<shards-1>.parquet at the root of a Hugging
    Face dataset, under `dir/` in the cache and in a mirror; the last shard is validation."""
    name: str  # what --source names
    repo: str  # the Hugging Face dataset
    shards: int
    dir: str

    def relpath(self, index):
        return f"{self.dir}/shard_{index:05d}.parquet"


# Shard counts from upstream nanochat's nanochat/dataset.py, whose MAX_SHARD is the last (validation)
# shard: 1822 for FineWeb-EDU until commit 324e69c, 6542 for ClimbMix from then on (HEAD 92d63d4).
CORPORA = {c.name: c for c in [
    Corpus("fineweb-edu", "karpathy/fineweb-edu-100b-shuffle", 1823, "pretrain"),
    Corpus("climbmix", "karpathy/climbmix-400b-shuffle", 6543, "climbmix"),
]}
DEFAULT_CORPUS = "fineweb-edu"
SHARD_RE = re.compile(rf"^({'|'.join(c.dir for c in CORPORA.values())})/shard_(\d{{5}})\.parquet$")


def corpus(name=None):
    """The pretraining corpus called `name` (None: the default); a SourceError naming the known ones."""
    name = DEFAULT_CORPUS if name is None else name
    if name not in CORPORA:
        raise SourceError(f"unknown pretraining source {name!r}; known sources: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


OWN = "own"  # the directory of your own text's files in files.json, and its name as a source
OWN_RE = re.compile(rf"^{OWN}/[^/]+\.parquet$")
PRETRAIN_RE = re.compile(f"{SHARD_RE.pattern}|{OWN_RE.pattern}")  # a declared file of pretraining text


def is_own_text(source):
    """Whether a --source names a folder of your own text (a path or URI: it has a "/") rather than
    a corpus."""
    return "/" in source


def source_of(relpath):
    """The pretraining source a declared file belongs to: its corpus's name, OWN, or None."""
    if OWN_RE.match(relpath):
        return OWN
    c = corpus_of(relpath)
    return c.name if c else None


def corpus_of(relpath):
    """The corpus a shard's relpath belongs to (by its directory), or None for any other file."""
    m = SHARD_RE.match(relpath)
    return next(c for c in CORPORA.values() if c.dir == m.group(1)) if m else None


@dataclasses.dataclass(frozen=True)
class Source:
    relpath: str  # path in the data cache and in a mirror
    url: str  # the real upstream URL
    size: int | None = None
    sha256: str | None = None

    @property
    def kind(self):
        """What the integrity check looks at: 'shard' (parquet with a `text` column), 'parquet',
        'zip', 'jsonl' or 'text'."""
        if SHARD_RE.match(self.relpath):
            return "shard"
        ext = self.relpath.rsplit(".", 1)[-1]
        return {"parquet": "parquet", "zip": "zip", "jsonl": "jsonl"}.get(ext, "text")


def _hf(repo, *paths):
    return [Source(f"hf/{repo}/{p}", f"{HF}/{repo}/resolve/main/{p}") for p in paths]


TASK_SOURCES = [
    *_hf("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet", "ARC-Challenge/test-00000-of-00001.parquet"),
    *_hf("cais/mmlu", *(f"all/{split}-00000-of-00001.parquet" for split in ("dev", "validation", "test"))),
    *_hf("openai/gsm8k", "main/train-00000-of-00001.parquet", "main/test-00000-of-00001.parquet"),
    *_hf("openai/openai_humaneval", "openai_humaneval/test-00000-of-00001.parquet"),
    *_hf("HuggingFaceTB/smol-smoltalk", "data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"),
    Source("identity_conversations.jsonl", f"{KARPATHY_S3}/identity_conversations.jsonl"),
    Source("words/words_alpha.txt", "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"),
]
# MMLU's 100k training questions, which upstream's chat_sft trains on: fetched by download only when
# asked (--mmlu-train, the GPU presets), as ../shared/data does not have it.
MMLU_TRAIN = _hf("cais/mmlu", "auxiliary_train/train-00000-of-00001.parquet")

REGISTRY = {s.relpath: s for s in [Source(EVAL_BUNDLE, f"{KARPATHY_S3}/eval_bundle.zip"), *TASK_SOURCES, *MMLU_TRAIN]}
# What the download stage fetches besides the pretraining text, which `pretrain_plan` plans.
GROUPS = {"eval": [EVAL_BUNDLE], "tasks": [s.relpath for s in TASK_SOURCES], "mmlu_train": [s.relpath for s in MMLU_TRAIN]}


def get(relpath):
    """The Source of a data file, by its relative path; a SourceError for an unknown one."""
    if relpath in REGISTRY:
        return REGISTRY[relpath]
    c = corpus_of(relpath)
    if c is not None and int(SHARD_RE.match(relpath).group(2)) < c.shards:
        return Source(relpath, f"{HF}/{c.repo}/resolve/main/{relpath.split('/', 1)[1]}")
    raise SourceError(f"unknown data file {relpath!r}: not in the registry (nanochat/sources.py)")


def mirror_root(mirror=None):
    """The mirror URI: the argument, else NANOCHAT_DATA_MIRROR, else None (the real sources)."""
    mirror = mirror or os.environ.get("NANOCHAT_DATA_MIRROR") or None
    try:
        return storage.normalize(mirror) if mirror else None
    except ValueError as e:  # a scheme storage does not know
        raise SourceError(f"data mirror {e} (NANOCHAT_DATA_MIRROR / --data-mirror)") from None


def url(source, mirror=None):
    """Where to fetch a source from: `<mirror>/<relpath>` with a mirror, else its upstream URL."""
    root = mirror_root(mirror)
    return storage.join(root, source.relpath) if root else source.url


def check_mirror(mirror=None):
    """Fails early, naming the mirror, when a path or bucket mirror does not exist. (An HTTP
    mirror answers per file: its first 404 names the URL.)"""
    root = mirror_root(mirror)
    if root is None or root.startswith(("http://", "https://")):
        return
    try:
        found = storage.isdir(root)
    except Exception as e:  # noqa: BLE001 - any filesystem error means the mirror is unusable
        raise SourceError(f"data mirror {root} is not readable ({type(e).__name__}: {e})") from None
    if not found:
        raise SourceError(f"data mirror {root} does not exist (NANOCHAT_DATA_MIRROR / --data-mirror)")


def shard_indices(corpus, mirror=None):
    """The shard numbers a Corpus offers, in order: upstream all of them, a mirror whatever it holds."""
    root = mirror_root(mirror)
    if root is None:
        return list(range(corpus.shards))
    directory = storage.join(root, corpus.dir)
    try:
        names = storage.listdir(directory)
    except Exception:  # noqa: BLE001 - e.g. an HTTP server without directory listings
        names = []
    found = sorted(int(m.group(2)) for n in names if (m := SHARD_RE.match(f"{corpus.dir}/{n}")))
    if not found and root.startswith(("http://", "https://")):
        found = list(range(_probe_count(root, corpus)))
    if not found:
        raise SourceError(f"data mirror {root} has no {corpus.dir}/shard_NNNNN.parquet files (source {corpus.name})")
    return found


def _probe_count(root, corpus):
    """Number of contiguous shards 0..k-1 an HTTP mirror serves, by HEAD requests (O(log k))."""
    def exists(i):
        try:
            with urllib.request.urlopen(urllib.request.Request(storage.join(root, corpus.relpath(i)), method="HEAD"), timeout=30):
                return True
        except urllib.error.HTTPError as e:
            if e.code in (403, 404, 410):
                return False
            raise SourceError(f"data mirror {root}: HTTP {e.code} probing for shards") from None
        except OSError as e:
            raise SourceError(f"data mirror {root} is unreachable ({e})") from None

    if not exists(0):
        return 0
    lo, hi = 0, 1  # exists(lo); find hi with not exists(hi), then bisect
    while exists(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if exists(mid) else (lo, mid)
    return hi


def pretrain_plan(num_shards, mirror=None, source=None):
    """(train shard numbers, validation shard number) of corpus `source` (None: the default) for
    `num_shards` training shards (-1: all). More than the corpus has is clamped to what it has; see
    the module docstring."""
    _check_count(num_shards)
    indices = shard_indices(corpus(source), mirror)
    return _split(indices, num_shards, f"the shard source has {len(indices)} shard(s)")


def own_text_plan(folder, num_shards):
    """(train file URIs, validation file URI) of your own text: the `.parquet` files directly in
    `folder` (a path or URI) in name order, the last one validation, and the first `num_shards` of
    the others (-1: all) training; fewer than `num_shards` is a SourceError."""
    _check_count(num_shards)
    root = storage.normalize(folder)
    try:
        names = storage.listdir(root) if storage.isdir(root) else None
    except Exception as e:  # noqa: BLE001 - any filesystem error means the folder is unusable
        raise SourceError(f"your text {root} is not a readable folder ({type(e).__name__}: {e})") from None
    if names is None:
        raise SourceError(f"your text {root}: no such folder")
    files = [storage.join(root, name) for name in names if name.endswith(".parquet")]
    if len(files) >= 2 and num_shards > len(files) - 1:  # a corpus is clamped to what it has; your files are all there is
        raise SourceError(f"your text {root} has {len(files) - 1} training file(s) besides the validation file, fewer than "
                          f"the {num_shards} asked for (-n); add files, or take them all: -n -1 here, and --num-shards -1 "
                          f"for base_train and base_eval")
    return _split(files, num_shards, f"your text {root} has {len(files)} .parquet file(s)")


def _check_count(num_shards):
    if num_shards < -1 or num_shards == 0:
        raise SourceError(f"number of shards must be -1 (all) or >= 1, not {num_shards}")


def _split(items, num_shards, found):
    """(the first `num_shards` of all but the last of `items` (-1: all), the last); `found` says
    what `items` are, for the error when they are fewer than 2."""
    if len(items) < 2:
        raise SourceError(f"{found}; need at least 2 (train + validation)")
    return (items[:-1] if num_shards == -1 else items[:-1][:num_shards]), items[-1]
