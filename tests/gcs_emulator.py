"""A local Google Cloud Storage emulator for the tests (`gcp-storage-emulator`, in the `test` extra).

The `gcs_emulator` fixture starts it on a free loopback port with an in-memory bucket, points this process (and
the commands its tests run) at it with `STORAGE_EMULATOR_HOST`, keeps every credential and metadata lookup on
loopback, so nothing leaves the machine, and stops it afterwards; `gcs_dir` is a fresh `gs://` folder in it.

Run as a script (`python tests/gcs_emulator.py --port 9023`) it serves the emulator with the fixes TensorStore
needs (`fix_emulator`): without them an empty upload fails (and TensorStore retries it for minutes), and Orbax's
OCDBT checkpoints cannot be written twice.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from http import HTTPStatus

import pytest

BUCKET = "t5x-lite-test"
START_TIMEOUT_S = 30


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_environment(endpoint: str, no_credentials_dir: str) -> dict[str, str]:
    """The variables that send every GCS request to `endpoint` and keep credential and metadata lookups on
    loopback (an unused port answers no metadata request; the gcloud config folder is empty)."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "CLOUDSDK_CONFIG": no_credentials_dir,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }


def wait_until_answering(endpoint: str, process: subprocess.Popen) -> None:
    """Returns once the emulator answers its health check; fails the test if it exits or stays silent."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the GCS emulator exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{endpoint}/", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"the GCS emulator did not answer at {endpoint} within {START_TIMEOUT_S} s")


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """The endpoint of an emulator that this process and its subprocesses reach (see the module docstring); one per
    test process, since TensorStore keeps the endpoint of a bucket it has opened."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, __file__, f"--port={port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_answering(endpoint, process)
        with tempfile.TemporaryDirectory() as no_credentials, pytest.MonkeyPatch.context() as env:
            env.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
            for name, value in offline_environment(endpoint, no_credentials).items():
                env.setenv(name, value)
            env.setenv("TENSORSTORE_GCS_HTTP_URL", endpoint)  # what storage.configure sets, even if it ran before
            yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def gcs_dir(gcs_emulator: str, request: pytest.FixtureRequest) -> str:
    """A `gs://` folder of the emulator's bucket that no other test uses."""
    return f"gs://{BUCKET}/{request.node.name}-{uuid.uuid4().hex[:8]}"


def _generation(storage, bucket: str, name: str) -> str:
    """The object's generation as GCS writes it; "0" when there is no such object (GCS's "does not exist")."""
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def fix_emulator() -> None:
    """Three things GCS does that the emulator does not, which TensorStore (and so Orbax's OCDBT) relies on.

    A media upload with an empty body is stored as an empty object (the emulator reads it as None and fails);
    an upload with `ifGenerationMatch` is refused (412) unless the object's generation matches, "0" meaning none
    exists; a download names the object's generation in `x-goog-generation` (TensorStore keeps it as the stamp
    of what it read, and OCDBT conditions its manifest updates on it). Call before the emulator's server module
    is imported: its routing table holds the handler functions themselves.
    """
    from gcp_storage_emulator.handlers import objects

    upload, download = objects._media_upload, objects.download

    def media_upload(request, response, storage):
        if request.data is None:
            request._data = b""
        expected = request.query.get("ifGenerationMatch")
        bucket, name = request.params["bucket_name"], request.query["name"][0]
        if expected and expected[0] != _generation(storage, bucket, name):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        return upload(request, response, storage)

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = _generation(storage, request.params["bucket_name"],
                                                        request.params["object_id"])

    objects._media_upload, objects.download = media_upload, download_with_generation


def serve(port: int) -> None:
    """Serves an in-memory emulator with the bucket `BUCKET` on 127.0.0.1:`port` until interrupted."""
    fix_emulator()
    from gcp_storage_emulator.server import create_server

    create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET).run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9023)
    serve(parser.parse_args().port)
