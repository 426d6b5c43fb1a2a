"""Storage by URI: local paths, file://, s3:// and http(s):// (read) through fsspec.

Everything the pipeline keeps (data cache, tokenizers, checkpoints, stage manifests, reports) lives
under one root, `NANOCHAT_STORAGE` (default `file://~/.cache/nanochat`). Writes are atomic: a
reader sees either the old object or the complete new one, never a partial file. On a local disk
that is a temp file + fsync + rename; on an object store a single PUT is already atomic.

Every filesystem call made here (not the streaming reads of `open`) is retried on transient errors
(connection, timeout, throttling, 5xx, EIO) with exponential backoff and full jitter (`retrying`);
permanent ones (permission, not found, bad input) are raised at once. Credentials come from the environment (s3fs/botocore), never from
stored config, and `redact` takes them out of every URI and message we log or record.
"""

import builtins
import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
import uuid

import fsspec

from nanochat.common import log

DEFAULT_STORAGE = "file://~/.cache/nanochat"
# The schemes used on purpose (http and https for reading: data sources and mirrors); of a chained
# URI (`simplecache::s3://...`, the tests' `faulty::file://...`) the one of the link with the path.
SCHEMES = ("file", "s3", "http", "https")
CHUNK = 1 << 20
# Attempts per operation and the first backoff (seconds, doubling up to RETRY_MAX_DELAY); the
# defaults ride out about a minute of outage. NANOCHAT_STORAGE_RETRIES / _RETRY_DELAY override them.
RETRIES = 8
RETRY_DELAY = 1.0
RETRY_MAX_DELAY = 60.0
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH,
                    errno.EREMOTEIO}  # s3fs turns 5xx into EREMOTEIO/EBUSY/EIO, 403 and 404 into the ones below
PERMANENT = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)
USERINFO = re.compile(r"(?<=://)[^/?#\s@]+@")  # scheme://user:password@host
SECRET_PARAM = re.compile(r"(?i)([?&][^=&#\s]*(?:signature|credential|token|secret|password|key)[^=&#\s]*=)[^&#\s]+")
SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY|API_KEY")


class StorageError(OSError):
    """A storage operation that kept failing with transient errors; the message names the URI."""


def storage_root(storage=None):
    """The storage root URI: the argument, else NANOCHAT_STORAGE, else the default."""
    return normalize(storage or os.environ.get("NANOCHAT_STORAGE") or DEFAULT_STORAGE)


def data_root(storage=None):
    """The data cache: `<storage>/data` (pretrain/, eval_bundle/, hf/, ...)."""
    return join(storage_root(storage), "data")


def normalize(uri):
    """Canonical form of a URI: plain paths become absolute file:// URIs, `~` is expanded. Every URI
    passes here, so an unsupported scheme is a ValueError naming it rather than a network error deep
    in fsspec (ftp://x/y: socket.gaierror)."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return "file://" + os.path.abspath(os.path.expanduser(uri))
    if uri.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(uri[len("file://"):]))
    scheme = uri.split("://", 1)[0].rsplit("::", 1)[-1]
    if scheme not in SCHEMES:
        raise ValueError(f"{redact(uri)}: unsupported storage scheme {scheme!r}; supported: a path or "
                         f"{', '.join(s + '://' for s in SCHEMES)} (http(s) for reading)")
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


# credentials and transient errors

def redact(value):
    """`value` (a URI, a message, or JSON-like data holding them) with credentials replaced by `***`:
    the user:password of URLs, credential query parameters (signatures, tokens, keys) and the values
    of secret-looking environment variables (AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...)."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if not isinstance(value, str):
        return value
    value = SECRET_PARAM.sub(r"\1***", USERINFO.sub("***@", value))
    for name, secret in os.environ.items():
        if len(secret) >= 8 and SECRET_ENV.search(name):  # short values would match everywhere
            value = value.replace(secret, "***")
    return value


def network_errors():
    """Connection-level errors of the optional S3 and HTTP clients."""
    out = []
    try:
        from botocore.exceptions import HTTPClientError  # endpoint unreachable, connect/read timeouts
        out.append(HTTPClientError)
    except ImportError:
        pass
    try:
        import aiohttp
        out += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    return tuple(out)


def http_status(e):
    """The HTTP status carried by a client error (botocore, aiohttp, urllib), or None."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    else:
        status = getattr(e, "status", None) or getattr(e, "code", None)
    return status if isinstance(status, int) and 100 <= status < 600 else None


def transient(exc):
    """Whether an error is worth retrying: connection trouble, timeouts, throttling (429), server
    errors (5xx), EIO-like OS errors; looked for in the exception and its causes (s3fs raises an
    OSError caused by botocore's error). Permission, not-found and bad-input errors are permanent."""
    while exc is not None:
        if isinstance(exc, PERMANENT):
            return False
        status = http_status(exc)
        if status is not None:
            return status in (408, 429) or status >= 500
        if isinstance(exc, (ConnectionError, TimeoutError, *network_errors())) or \
                getattr(exc, "errno", None) in TRANSIENT_ERRNOS:
            return True
        exc = exc.__cause__
    return False


def retrying(what, uri, fn, *args):
    """fn(*args), retried on transient errors with exponential backoff and full jitter, a warning
    naming `uri` each time; a StorageError once the attempts are spent. Permanent errors propagate."""
    attempts = int(os.environ.get("NANOCHAT_STORAGE_RETRIES", RETRIES))
    delay = float(os.environ.get("NANOCHAT_STORAGE_RETRY_DELAY", RETRY_DELAY))
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args)
        except Exception as e:
            if not transient(e):
                raise
            error = redact(f"{type(e).__name__}: {e}")
            if attempt == attempts:
                raise StorageError(f"{what} {redact(uri)} failed after {attempts} attempts: {error}") from None
            wait = random.uniform(0, min(RETRY_MAX_DELAY, delay * 2 ** (attempt - 1)))
            log.warning("%s %s failed (%s); retrying in %.2f s (attempt %d of %d)", what, redact(uri), error, wait,
                        attempt + 1, attempts)
            time.sleep(wait)


# operations

def exists(uri):
    fs, path = filesystem(uri)
    return retrying("exists", uri, fs.exists, path)


def isdir(uri):
    fs, path = filesystem(uri)
    return retrying("isdir", uri, fs.isdir, path)


def size(uri):
    fs, path = filesystem(uri)
    return retrying("size", uri, fs.size, path)


def listdir(uri):
    """Names (not URIs) of the entries directly under `uri`, sorted; [] if it does not exist."""
    fs, path = filesystem(uri)
    try:
        entries = retrying("list", uri, fs.ls, path, False)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def open(uri, mode="rb", **kwargs):  # noqa: A001 - mirrors fsspec.open
    """An open file object for streaming reads (not retried; prefer `read_bytes`), or non-atomic
    writing (prefer `atomic_write`)."""
    return fsspec.open(normalize(uri), mode, **kwargs).open()


def remove(uri, recursive=False):
    fs, path = filesystem(uri)
    if retrying("exists", uri, fs.exists, path):
        retrying("remove", uri, fs.rm, path, recursive)


@contextlib.contextmanager
def atomic_write(uri, mode="wb"):
    """Yields a file to write, staged locally (next to `uri` on a local disk, so that the rename is
    atomic); once the block completes the file is committed at `uri`, else nothing appears there."""
    assert mode in ("wb", "w"), "atomic_write writes whole files: mode 'wb' or 'w'"
    path = local_path(uri)
    directory = os.path.dirname(path) if path is not None else None
    if directory:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, uri)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def commit(staged, uri):
    """Moves a staged local file to `uri` in one step: a rename on a local disk (`staged` next to
    it), one PUT of the whole file on an object store (never a visible partial object)."""
    path = local_path(uri)
    if path is not None:
        retrying("rename to", uri, os.replace, staged, path)
        return
    fs, rpath = filesystem(uri)
    retrying("upload to", uri, fs.put_file, staged, rpath)


def upload(local, uri):
    """Copies a local file to `uri` atomically."""
    if local_path(uri) is None:
        commit(local, uri)
        return
    with builtins.open(local, "rb") as src, atomic_write(uri) as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def download(uri, local):
    """Copies `uri` to a local path atomically (temp file in the same directory, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
    fs, path = filesystem(uri)
    try:
        retrying("download", uri, fs.get_file, path, tmp)
        os.replace(tmp, local)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def copy(src, dst):
    """Copies one object between any two URIs, atomically at the destination."""
    with tempfile.TemporaryDirectory(prefix="nanochat-copy-") as tmp:
        local = os.path.join(tmp, "blob")
        download(src, local)
        upload(local, dst)


def read_bytes(uri):
    fs, path = filesystem(uri)
    return retrying("read", uri, fs.cat_file, path)


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
        raise ValueError(f"{redact(uri)}: invalid JSON ({e})") from None


def write_json(uri, obj):
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def sha256(uri):
    """Hex sha256 of an object's bytes, streamed (the whole read retried on a transient error)."""
    return retrying("read", uri, stream_sha256, uri)


def stream_sha256(uri):
    h = hashlib.sha256()
    with open(uri, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()
