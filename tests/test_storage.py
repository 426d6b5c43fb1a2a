"""Storage by URI: atomic writes locally and on a real S3-compatible server."""

import os

import pytest

from nanochat import storage


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    return storage.normalize(str(tmp_path)) if request.param == "file" else request.getfixturevalue("s3_root")


def test_normalize_and_run_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_STORAGE", str(tmp_path))
    assert storage.normalize("rel/x") == "file://" + os.path.abspath("rel/x")
    assert storage.run_uri("abc") == f"file://{tmp_path}/runs/abc"
    assert storage.run_uri("s3://b/p/run/") == "s3://b/p/run"
    assert storage.data_root() == f"file://{tmp_path}/data"
    with pytest.raises(ValueError):
        storage.run_uri("..")


def test_an_unsupported_scheme_is_refused_naming_the_uri_and_the_schemes(monkeypatch):
    """Not a socket.gaierror from deep in fsspec; credentials stay out of the message."""
    monkeypatch.setenv("NANOCHAT_STORAGE", "ftp://user:pw@x/y")
    with pytest.raises(ValueError, match=r"^ftp://\*\*\*@x/y: unsupported storage scheme 'ftp'; supported: a path or "
                                         r"file://, s3://, http://, https://"):
        storage.run_uri("r")
    assert storage.normalize("simplecache::s3://b/x/") == "simplecache::s3://b/x"  # a chain: its path's scheme
    assert storage.normalize("http://[::1]:8000/x") == "http://[::1]:8000/x"


def test_roundtrip(root):
    uri = storage.join(root, "a", "b.json")
    assert not storage.exists(uri)
    storage.write_json(uri, {"x": [1, 2]})
    assert storage.read_json(uri) == {"x": [1, 2]}
    storage.write_text(storage.join(root, "a", "c.txt"), "héllo")
    assert storage.listdir(storage.join(root, "a")) == ["b.json", "c.txt"]
    assert storage.read_text(storage.join(root, "a", "c.txt")) == "héllo"
    assert storage.size(storage.join(root, "a", "c.txt")) == len("héllo".encode())
    assert storage.listdir(storage.join(root, "missing")) == []


def test_sha256_and_copy_between_filesystems(root, tmp_path):
    import hashlib

    data = os.urandom(3 * storage.CHUNK + 17)
    src = storage.normalize(str(tmp_path / "src.bin"))
    storage.write_bytes(src, data)
    dst = storage.join(root, "copy", "dst.bin")
    storage.copy(src, dst)
    assert storage.sha256(dst) == hashlib.sha256(data).hexdigest()
    back = tmp_path / "back" / "x.bin"
    storage.download(dst, str(back))
    assert hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_failed_write_leaves_nothing(root):
    uri = storage.join(root, "d", "half.bin")
    storage.write_bytes(uri, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_write(uri) as f:
            f.write(b"new partial")
            raise RuntimeError("crash mid-write")
    assert storage.read_bytes(uri) == b"old"
    assert storage.listdir(storage.join(root, "d")) == ["half.bin"]  # no temp files left behind


def test_invalid_json_names_the_uri(root):
    uri = storage.join(root, "bad.json")
    storage.write_text(uri, "{not json")
    with pytest.raises(ValueError, match="bad.json"):
        storage.read_json(uri)
