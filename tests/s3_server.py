"""A real S3 endpoint for tests and benchmarks: moto's server mode in a subprocess.

Used by the `s3` fixture in conftest.py and by bench/read_region.py. The server listens
on a free loopback port; the AWS variables point at it with dummy credentials.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Dummy credentials: moto accepts any. The secret is distinctive so tests can check that
# it never shows up in output, errors or written metadata.
ACCESS_KEY_ID = "dregtestaccesskey"
SECRET_ACCESS_KEY = "dreg-test-secret-5f2c9a-never-print"
REGION = "us-east-1"
START_TIMEOUT_S = 30.0


@dataclass
class S3Server:
    """A running moto server: its endpoint and a bucket made on it."""

    endpoint_url: str
    bucket: str
    process: subprocess.Popen

    def uri(self, *parts: str) -> str:
        """An s3:// URI in the bucket."""
        return "/".join([f"s3://{self.bucket}", *parts])

    def stop(self) -> None:
        """Stop this server process (only the one this helper started)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answering(
    url: str, process: subprocess.Popen, timeout: float = START_TIMEOUT_S
) -> None:
    """Wait until a server started as `process` answers `url`; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def environment(endpoint_url: str) -> dict[str, str]:
    """The variables that point boto3, s3fs and dreg at the server."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "DREG_S3_ENDPOINT_URL": endpoint_url,
    }


def start(bucket: str = "dreg-test") -> S3Server:
    """Start moto on a free loopback port, wait until it answers, create `bucket`."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = S3Server(endpoint_url=endpoint, bucket=bucket, process=process)
    try:
        wait_until_answering(endpoint + "/", process)
        _create_bucket(endpoint, bucket)
    except BaseException:
        server.stop()
        raise
    return server


def _create_bucket(endpoint_url: str, bucket: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        region_name=REGION,
    )
    client.create_bucket(Bucket=bucket)


@contextmanager
def environment_set(endpoint_url: str) -> Iterator[None]:
    """Set the server's variables in os.environ; restore the previous values after."""
    saved = {name: os.environ.get(name) for name in environment(endpoint_url)}
    os.environ.update(environment(endpoint_url))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def running(bucket: str = "dreg-test") -> Iterator[S3Server]:
    """A moto server with `bucket`, and the environment pointing at it, for a `with` block."""
    server = start(bucket)
    try:
        with environment_set(server.endpoint_url):
            yield server
    finally:
        server.stop()
