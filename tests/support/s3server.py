"""A real S3-compatible server (moto) on 127.0.0.1 for s3:// tests.

`s3_env(monkeypatch, server)` points boto3/s3fs at it through the environment, the way a user
points them at any S3 endpoint; buckets are created with boto3.
"""

import contextlib
import socket
import threading

import boto3


def free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_app():
    """moto's S3 (and its other services) as a WSGI app, to wrap in a middleware for moto_server."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return DomainDispatcherApplication(create_backend_app)


@contextlib.contextmanager
def moto_server(app=None):
    """A moto server (`app`, by default moto_app()) on a port of 127.0.0.1 it binds itself, rather
    than one picked earlier, which another process may take meanwhile (moto's ThreadedMotoServer
    would then wait forever for its server thread): yields its endpoint URL."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    class Quiet(MotoRequestHandler):
        def log_request(self, *args):  # keep test output clean
            pass

    server = make_server("127.0.0.1", 0, app or moto_app(), threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def s3_env(monkeypatch, endpoint):
    """Environment for s3fs/boto3 to use the moto server (test credentials, no real AWS)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)


def make_bucket(endpoint, name):
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing-secret").create_bucket(Bucket=name)
