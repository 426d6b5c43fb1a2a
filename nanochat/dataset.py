"""The data cache: downloads of registered sources into `<storage>/data/<relpath>`.

`download(relpaths)` fetches files in parallel (at most `workers` at a time). Each file:
- is skipped when it is already in the cache with the size recorded in the cache's manifest
  (`<storage>/data/manifest.json`, relpath -> url, bytes, sha256): a second run moves no bytes;
  `verify=True` re-hashes cached files and re-fetches the ones that do not match;
- streams into a partial file (`<data>/.partial/<relpath>`, locked so that two processes never
  write one file) that a retry continues with an HTTP Range request where the server allows it;
- is retried with exponential backoff and full jitter on connection errors, timeouts, 429 and
  5xx (honouring Retry-After); the attempt count resets whenever an attempt made progress;
- is checked before it appears: the size the server announced (or the pinned size), a readable
  parquet footer (with a `text` column for pretraining shards) or zip directory, the pinned
  sha256; a file that fails is fetched again from scratch;
- appears under its final name only when complete (rename on a local disk, one PUT remotely).
A permanent failure raises `DownloadError`, one line naming the URL and the reason.

`fetch(relpath)` is the one-file form the tasks use; `shard_waiter` lets a training loader start
on the first shards while a download stage (another process) still fetches the rest: it waits
on the partial file's lock, then finds the file done. The shard functions take `source`, the name
of a pretraining corpus (sources.CORPORA; None: the run's, else the default).

In a pipeline run (a stage in a run whose download stage is committed, `stage.declare_data`), the
functions a stage reads data through (`fetch`, `pretrain_shards`, `shard_split`, `eval_bundle_dir`)
take every file from the run's files.json instead and never download: a file it does not declare,
or that is not there, is a StageError naming it. The shards are the declared ones, all of one corpus
or all your own text (`own_text`: declared where it is): a `source` other than theirs is a StageError.
"""

import contextlib
import fcntl
import hashlib
import http.client
import math
import os
import random
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat import shards, sources, stage, storage
from nanochat.common import InputError, log

MANIFEST = "manifest.json"
CHUNK = 1 << 20
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class DownloadError(InputError, RuntimeError):
    """A file could not be fetched; the message is one line naming the URL and the reason."""


class Transient(Exception):
    """A failure worth retrying (connection, timeout, 429, 5xx, truncated body)."""

    def __init__(self, reason, retry_after=None, moved=0):
        super().__init__(reason)
        self.retry_after, self.moved = retry_after, moved


class Corrupt(Exception):
    """A complete transfer whose bytes fail an integrity check; fetched again from scratch."""


class Manifest:
    """`<data>/manifest.json`: relpath -> {url, bytes, sha256} of every file in the cache.
    Each update re-reads the file, so entries written by another process are kept."""

    def __init__(self, data_root):
        self.uri = storage.join(data_root, MANIFEST)
        self._lock = threading.Lock()
        self._entries = None

    def _read(self):
        self._entries = storage.read_json(self.uri) if storage.exists(self.uri) else {}
        return self._entries

    def get(self, relpath, fresh=False):
        with self._lock:
            return (self._read() if fresh or self._entries is None else self._entries).get(relpath)

    def put(self, relpath, entry):
        with self._lock:
            self._read()[relpath] = entry
            storage.write_json(self.uri, self._entries)


def users_partial_folder():
    """This user's folder under the temp dir for the partial files of a remote cache (mode 700): one
    shared by all would belong to whichever user made it first, and the others could not write there."""
    path = os.path.join(tempfile.gettempdir(), f"nanochat-partial-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_uid != os.getuid():
        raise DownloadError(f"{path}: the folder for this user's partial downloads belongs to another user")
    return path

@contextlib.contextmanager
def _partial_file(data_root, dest, relpath):
    """The local path where `relpath` is assembled, held under an exclusive lock. On a local
    cache it is `<data>/.partial/<relpath>` (same disk: the final rename is atomic); for a remote
    cache a stable path under the temp dir, so that a later run still resumes it."""
    local_root = storage.local_path(data_root)
    if local_root is None:
        local_root = os.path.join(users_partial_folder(), hashlib.sha256(dest.encode()).hexdigest()[:16])
    path = os.path.join(local_root, ".partial", relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process fetching this file: wait for it
        yield path


def _open_http(url, offset, timeout, validator=None):
    """(response, start, total) for the bytes of `url` from `offset`; start is 0 when the server
    ignores the Range request, or when the file changed since `validator` (an ETag or date, sent
    as If-Range) was seen. Raises Transient or DownloadError."""
    headers = {"Range": f"bytes={offset}-", **({"If-Range": validator} if validator else {})} if offset else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416:  # the partial file is not a prefix of this file: start over
            raise Corrupt("the server refused to resume (HTTP 416)") from None
        if e.code in (408, 429) or e.code >= 500:
            retry_after = e.headers.get("Retry-After", "")
            raise Transient(f"HTTP {e.code} {e.reason}", float(retry_after) if retry_after.isdigit() else None) from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        raise Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
    length = response.headers.get("Content-Length")
    if response.status == 206:
        m = CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            response.close()
            raise Corrupt(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
        return response, offset, int(m.group(3))
    return response, 0, int(length) if length is not None else None


def _open_fsspec(uri, offset):
    """(file, offset, total) for any other URI (file://, s3://, a path) through fsspec."""
    fs, path = storage.filesystem(uri)
    try:
        total = fs.size(path)
        f = fs.open(path, "rb")
        f.seek(offset)
    except FileNotFoundError:
        raise DownloadError(f"{uri}: not found") from None
    except OSError as e:
        raise Transient(f"{type(e).__name__}: {e}") from None
    return f, offset, total


def _transfer(url, partial, timeout, bar):
    """Appends the rest of `url` to the `partial` file; returns the number of bytes moved.
    Raises Transient when the body ends early or the connection fails mid-way. Over HTTP the
    file's validator (strong ETag, else Last-Modified) is kept next to the partial file, so that a
    resume never appends bytes of a newer version of the file."""
    offset = os.path.getsize(partial) if os.path.exists(partial) else 0
    if url.startswith(("http://", "https://")):
        validator_path = partial + ".validator"
        validator = _read_text(validator_path) if offset else None
        stream, start, total = _open_http(url, offset, timeout, validator)
        if start == 0:
            etag = stream.headers.get("ETag", "")
            storage.write_text(storage.normalize(validator_path),
                               etag if etag and not etag.startswith("W/") else stream.headers.get("Last-Modified", ""))
    else:
        stream, start, total = _open_fsspec(url, offset)
    expected = total - start if total is not None else 0
    bar.add(0, expected)
    moved = 0
    with stream, open(partial, "r+b" if start else "wb") as out:
        out.truncate(start)
        out.seek(start)
        read = getattr(stream, "read1", stream.read)  # read1: keep what arrived before a reset
        try:
            while block := read(CHUNK):
                out.write(block)
                moved += len(block)
                bar.add(len(block))
        except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
            raise Transient(f"connection failed after {start + moved:,} bytes ({type(e).__name__}: {e})", moved=moved) from None
        finally:
            out.flush()
            os.fsync(out.fileno())
            bar.add(0, moved - expected)  # the bar's total counts the bytes that did arrive
    if total is not None and start + moved != total:
        raise Transient(f"body ended after {start + moved:,} of {total:,} bytes", moved=moved)
    return moved


def _read_text(path):
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        return f.read() or None
    return None


def check_file(path, source):
    """The sha256 of a complete local file, after the integrity checks of its kind (the size
    the server announced is checked by the transfer); Corrupt if one fails."""
    uri = storage.normalize(path)
    size = os.path.getsize(path)
    if source.size is not None and size != source.size:
        raise Corrupt(f"size {size:,} bytes, expected {source.size:,}")
    try:
        if source.kind == "shard":
            shards.open_shard(uri).close(force=True)
        elif source.kind == "parquet":
            pq.ParquetFile(path).close()
        elif source.kind == "zip":
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
                if bad is not None:
                    raise Corrupt(f"zip member {bad} fails its CRC")
    except (shards.ShardError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise Corrupt(f"{source.kind} check failed: {e}".replace(uri + ": ", "")) from None
    digest = storage.sha256(uri)
    if source.sha256 is not None and digest != source.sha256:
        raise Corrupt(f"sha256 {digest} does not match the pinned {source.sha256}")
    return digest


class Progress(tqdm):
    """A bytes bar whose total grows as servers announce sizes; safe to share between threads."""

    def add(self, done, total=0):
        with self.get_lock():
            if total:
                self.total += total
                self.refresh()
            if done:
                self.update(done)


class Downloader:
    """Fetches registered sources into the data cache of `storage` from `mirror` (or upstream)."""

    def __init__(self, storage_uri=None, mirror=None, workers=4, retries=5, timeout=60.0, backoff=1.0,
                 max_backoff=60.0, verify=False, progress=True):
        self.data_root = storage.data_root(storage_uri)
        self.mirror = sources.mirror_root(mirror)
        self.workers, self.retries, self.timeout = workers, retries, timeout
        self.backoff, self.max_backoff, self.verify = backoff, max_backoff, verify
        self.manifest = Manifest(self.data_root)
        self.progress = progress

    def cache_uri(self, relpath):
        return storage.join(self.data_root, relpath)

    def download(self, relpaths):
        """Fetches every file (in this order, `workers` at a time); returns one manifest entry
        per file, with `fetched` = the bytes moved this time. Raises the first DownloadError."""
        relpaths = list(dict.fromkeys(relpaths))
        found = [sources.get(r) for r in relpaths]
        with Progress(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="download",
                      disable=not self.progress, mininterval=1.0) as bar:
            with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
                futures = [pool.submit(self._fetch, source, bar) for source in found]
                try:
                    return [f.result() for f in futures]
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise

    def fetch(self, relpath):
        """The cache URI of one registered file, downloading it first if needed."""
        self.download([relpath])
        return self.cache_uri(relpath)

    def _fetch(self, source, bar):
        dest = self.cache_uri(source.relpath)
        entry = self._cached(source, dest)
        if entry is not None:
            return {**entry, "fetched": 0}
        url = sources.url(source, self.mirror)
        with _partial_file(self.data_root, dest, source.relpath) as partial:
            entry = self._cached(source, dest, fresh=True)  # another process may have finished it meanwhile
            if entry is not None:
                return {**entry, "fetched": 0}
            fetched, digest = self._fetch_verified(url, source, partial, bar)
            size = os.path.getsize(partial)
            self._publish(partial, dest)
        entry = {"url": url, "bytes": size, "sha256": digest}
        self.manifest.put(source.relpath, entry)
        return {"relpath": source.relpath, "uri": dest, **entry, "fetched": fetched}

    def _cached(self, source, dest, fresh=False):
        """The manifest entry of a file already in the cache and trusted, else None. A file
        without an entry (e.g. a run stopped between rename and manifest update) is checked now."""
        if not storage.exists(dest):
            return None
        entry = self.manifest.get(source.relpath, fresh)
        if entry is not None and storage.size(dest) == entry["bytes"]:
            if not self.verify or storage.sha256(dest) == entry["sha256"]:
                return {"relpath": source.relpath, "uri": dest, **entry}
        elif entry is None and (path := storage.local_path(dest)) is not None:
            try:
                entry = {"url": sources.url(source, self.mirror), "bytes": os.path.getsize(path),
                         "sha256": check_file(path, source)}
            except Corrupt:
                return None
            self.manifest.put(source.relpath, entry)
            return {"relpath": source.relpath, "uri": dest, **entry}
        return None

    def _fetch_verified(self, url, source, partial, bar):
        """(bytes moved, sha256) once `partial` holds the whole verified file."""
        moved, failures, furthest = 0, 0, 0
        while True:
            try:
                moved += _transfer(url, partial, self.timeout, bar)
                return moved, check_file(partial, source)
            except Transient as e:
                moved += e.moved
                reason, retry_after = str(e), e.retry_after
                # an attempt that got further into the file than any before is not a failure
                size = os.path.getsize(partial) if os.path.exists(partial) else 0
                failures = 0 if size > furthest else failures + 1
                furthest = max(furthest, size)
            except Corrupt as e:
                reason, retry_after = str(e), None
                failures += 1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial)
            if failures > self.retries:
                raise DownloadError(f"{url}: {reason} (gave up after {failures} failed attempts)")
            delay = random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (failures - 1)))
            time.sleep(max(delay, min(retry_after or 0, self.max_backoff)))

    def _publish(self, partial, dest):
        path = storage.local_path(dest)
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(partial, path)
        else:
            storage.upload(partial, dest)
            os.unlink(partial)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial + ".validator")


def fetch(relpath, storage_uri=None, mirror=None, **options):
    """The cache URI of a registered data file, downloaded on first use (no progress bar); in a
    pipeline run, the run's declared file."""
    if (declared := stage.declared_data()) is not None:
        return declared.resolve(relpath)
    return Downloader(storage_uri, mirror, progress=False, **options).fetch(relpath)


def pretrain_shards(num_shards, storage_uri=None, mirror=None, source=None):
    """(train shard URIs, validation shard URI) of corpus `source` in the cache for `num_shards`
    training shards; they may not be there yet: give the loader `wait_for_shard=shard_waiter(...)`.
    In a pipeline run, the first `num_shards` declared training shards and the last declared shard
    (validation)."""
    if (declared := stage.declared_data()) is not None:
        *train, val = _declared_shards(declared, source)
        if num_shards != -1 and num_shards > len(train):
            more = "" if sources.source_of(val) == sources.OWN else "download more (-n) or "
            raise stage.StageError(f"{num_shards} training shards wanted, but {declared.uri} declares {len(train)}; "
                                   f"{more}ask for fewer (--num-shards; -1: all)")
        train = train if num_shards == -1 else train[:num_shards]
        return [declared.resolve(r) for r in train], declared.resolve(val)
    c = _corpus(source)
    try:
        train, val = sources.pretrain_plan(num_shards, mirror, c.name)
    except sources.SourceError as e:
        raise stage.StageError(str(e)) from None
    root = storage.data_root(storage_uri)
    return [storage.join(root, c.relpath(i)) for i in train], storage.join(root, c.relpath(val))


def shard_split(split, storage_uri=None, source=None):
    """The shards of `split` ('train': all but the last, 'val': the last) among those of corpus
    `source` in the data cache, or, in a pipeline run, the declared ones."""
    if (declared := stage.declared_data()) is not None:
        return [declared.resolve(r) for r in shards.split_shards(_declared_shards(declared, source), split)]
    directory = storage.join(storage.data_root(storage_uri), _corpus(source).dir)
    return shards.split_shards(shards.list_shards(directory), split)


def _corpus(source):
    """sources.corpus(source), its error a StageError (one line: the known sources)."""
    try:
        return sources.corpus(source)
    except sources.SourceError as e:
        raise stage.StageError(str(e)) from None


def _declared_shards(declared, source=None):
    """The relpaths of the shards files.json declares (at least a training and a validation one),
    all of one source (a corpus, or your own text), and of corpus `source` if one is named."""
    relpaths = declared.relpaths(sources.PRETRAIN_RE)
    found = sorted({sources.source_of(r) for r in relpaths})
    if len(found) > 1:
        raise stage.StageError(f"{declared.uri} declares shards of {' and '.join(found)}; a run pretrains on one source")
    if source is not None and found and found != [_corpus(source).name]:
        raise stage.StageError(f"the run's download fetched {found[0]} shards ({declared.uri}), not {source}; "
                               f"download {source} in another run, or drop --source")
    if len(relpaths) < 2:
        raise stage.StageError(f"{declared.uri} declares {len(relpaths)} pretraining shard(s); need at least 2 "
                               f"(train + validation)")
    return relpaths


def own_text(folder, num_shards=-1, min_chars=None):
    """The files.json entries of your own pretraining text (`sources.own_text_plan`'s files; with
    `min_chars`, only the first training files that hold that much text, see enough_text), each
    checked to be parquet with a string `text` column, no null and some text (`shards.check_texts`: a
    ShardError naming the file) and hashed; declared where they are, never copied."""
    train, val = sources.own_text_plan(folder, num_shards)
    checked = {}

    def check(uris):
        for uri in uris:
            checked[uri] = shards.check_texts(uri)
        return [checked[uri] for uri in uris]

    train = enough_text(train, min_chars, check)
    check([uri for uri in [*train, val] if uri not in checked])
    return [{"relpath": f"{sources.OWN}/{uri.rsplit('/', 1)[-1]}", "uri": uri, "url": uri, "bytes": storage.size(uri),
             "sha256": storage.sha256(uri), "fetched": 0} for uri in [*train, val]]


def enough_text(candidates, min_chars, count):
    """The first of `candidates` (training shards or files, in order) that together hold at least
    `min_chars` characters of text, or all of them where they hold less (the log says so); with
    `min_chars` None all of them, none counted. `count(batch)` gives each one's characters, fetching
    it first where it must: one candidate, then at once as many more as the average so far says are
    missing, until they hold enough. So a preset can ask for the text it trains on, whatever the size
    of a source's shards (a real FineWeb-EDU shard holds about 250M characters, a mirror's fewer)."""
    if min_chars is None:
        return candidates
    taken = chars = 0
    while chars < min_chars and taken < len(candidates):
        more = 1 if taken == 0 else math.ceil((min_chars - chars) * taken / max(chars, 1))
        batch = candidates[taken:taken + more]
        chars += sum(count(batch))
        taken += len(batch)
    if chars < min_chars:
        log.info("all %d training shards hold %s characters, fewer than the %s asked for (--min-chars): "
                 "taking them all", taken, f"{chars:,}", f"{min_chars:,}")
    else:
        log.info("the first %d training shards hold %s characters (--min-chars %s)", taken, f"{chars:,}", f"{min_chars:,}")
    return candidates[:taken]


def shard_waiter(storage_uri=None, mirror=None, source=None):
    """A `wait_for_shard(uri)` for the loader of corpus `source`: returns once the shard is in the
    cache, waiting for a download in progress (or fetching it itself if none is). None in a
    pipeline run, whose shards are all there."""
    if stage.declared_data() is not None:
        return None
    directory = _corpus(source).dir
    downloader = Downloader(storage_uri, mirror, progress=False)
    return lambda uri: downloader.fetch(f"{directory}/{uri.rsplit('/', 1)[-1]}")


def extract_zip(zip_uri, dest_root):
    """Extracts a zip from the cache under `dest_root`, each member written atomically; members
    already there with the right size are left alone. Returns the member URIs."""
    out = []
    with storage.open(zip_uri, "rb") as f, zipfile.ZipFile(f) as z:
        for info in z.infolist():
            name = info.filename
            if info.is_dir():
                continue
            if name.startswith("/") or ".." in name.split("/"):
                raise DownloadError(f"{zip_uri}: unsafe member name {name!r}")
            uri = storage.join(dest_root, name)
            if not (storage.exists(uri) and storage.size(uri) == info.file_size):
                with z.open(info) as src, storage.atomic_write(uri) as dst:
                    while block := src.read(CHUNK):
                        dst.write(block)
            out.append(uri)
    return out


def eval_bundle_dir(storage_uri=None, mirror=None):
    """The unpacked CORE eval bundle in the data cache (<data>/eval_bundle), fetched and unpacked
    first if it is not there. In a pipeline run, the declared eval_bundle.zip's, unpacked beside it
    (download did that; if the directory has gone, it is unpacked again from the zip)."""
    if (declared := stage.declared_data()) is not None:
        zip_uri = declared.resolve(sources.EVAL_BUNDLE)
        root = zip_uri.rsplit("/", 1)[0]
    else:
        zip_uri, root = None, storage.data_root(storage_uri)
    bundle = storage.join(root, "eval_bundle")
    if not storage.exists(storage.join(bundle, "core.yaml")):
        extract_zip(zip_uri or fetch(sources.EVAL_BUNDLE, storage_uri, mirror), root)
    return bundle
