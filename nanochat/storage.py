"""Storage by URI: local paths, file://, s3:// and http(s):// (read) through fsspec.

Everything the pipeline keeps (data cache, tokenizers, checkpoints, stage manifests, reports) lives
under one root, `NANOCHAT_STORAGE` (default `file://~/.cache/nanochat`). Writes are atomic: a
reader sees either the old object or the complete new one, never a partial file. On a local disk
that is a temp file + fsync + rename; on an object store a single PUT is already atomic.
Credentials come from the environment (s3fs/botocore), never from stored config.
"""

import builtins
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid

import fsspec

DEFAULT_STORAGE = "file://~/.cache/nanochat"
CHUNK = 1 << 20


def storage_root(storage=None):
    """The storage root URI: the argument, else NANOCHAT_STORAGE, else the default."""
    return normalize(storage or os.environ.get("NANOCHAT_STORAGE") or DEFAULT_STORAGE)


def data_root(storage=None):
    """The data cache: `<storage>/data` (pretrain/, eval_bundle/, hf/, ...)."""
    return join(storage_root(storage), "data")


def normalize(uri):
    """Canonical form of a URI: plain paths become absolute file:// URIs, `~` is expanded."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return "file://" + os.path.abspath(os.path.expanduser(uri))
    if uri.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(uri[len("file://"):]))
    return uri.rstrip("/")


def run_uri(run, storage=None):
    """A run name `X` means `<storage>/runs/X`; a URI or a path is taken as is."""
    if "://" in run or os.sep in run or run.startswith("~"):
        return normalize(run)
    if not run or run in (".", ".."):
        raise ValueError(f"invalid run name {run!r}")
    return join(storage_root(storage), "runs", run)


def join(base, *parts):
    out = base.rstrip("/")
    for part in parts:
        out += "/" + str(part).strip("/")
    return out


def local_path(uri):
    """The filesystem path of a local URI, or None for a remote one."""
    uri = normalize(uri)
    return uri[len("file://"):] if uri.startswith("file://") else None


def filesystem(uri):
    """(fsspec filesystem, path inside it) for a URI."""
    return fsspec.core.url_to_fs(normalize(uri))


def exists(uri):
    fs, path = filesystem(uri)
    return fs.exists(path)


def isdir(uri):
    fs, path = filesystem(uri)
    return fs.isdir(path)


def size(uri):
    fs, path = filesystem(uri)
    return fs.size(path)


def listdir(uri):
    """Names (not URIs) of the entries directly under `uri`, sorted; [] if it does not exist."""
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def open(uri, mode="rb", **kwargs):  # noqa: A001 - mirrors fsspec.open
    """An open file object for reading (or non-atomic writing); prefer `atomic_write` to write."""
    return fsspec.open(normalize(uri), mode, **kwargs).open()


def remove(uri, recursive=False):
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


@contextlib.contextmanager
def atomic_write(uri, mode="wb"):
    """Yields a file to write; the object appears at `uri` only if the block completes."""
    assert mode in ("wb", "w"), "atomic_write writes whole files: mode 'wb' or 'w'"
    path = local_path(uri)
    if path is not None:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    # Remote: stage locally, then one upload (a single PUT is atomic on object stores).
    with tempfile.TemporaryDirectory(prefix="nanochat-upload-") as tmpdir:
        tmp = os.path.join(tmpdir, "blob")
        with builtins.open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        upload(tmp, uri)



def upload(local, uri):
    """Copies a local file to `uri` atomically."""
    path = local_path(uri)
    if path is not None:
        with builtins.open(local, "rb") as src, atomic_write(uri) as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        return
    fs, rpath = filesystem(uri)
    fs.put_file(local, rpath)


def download(uri, local):
    """Copies `uri` to a local path atomically (temp file in the same directory, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(uri, "rb") as src, builtins.open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        os.replace(tmp, local)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def copy(src, dst):
    """Copies one object between any two URIs, atomically at the destination."""
    with open(src, "rb") as fsrc, atomic_write(dst) as fdst:
        shutil.copyfileobj(fsrc, fdst, CHUNK)


def read_bytes(uri):
    with open(uri, "rb") as f:
        return f.read()


def write_bytes(uri, data):
    with atomic_write(uri) as f:
        f.write(data)


def read_text(uri):
    return read_bytes(uri).decode("utf-8")


def write_text(uri, text):
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri):
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: invalid JSON ({e})") from None


def write_json(uri, obj):
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def sha256(uri):
    """Hex sha256 of an object's bytes, streamed."""
    h = hashlib.sha256()
    with open(uri, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()
