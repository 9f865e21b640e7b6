"""The local GCS emulator tests/test_gcs.py runs: gcp-storage-emulator, in memory, on 127.0.0.1, plus the two object
generation rules of real GCS that it lacks and TensorStore relies on.

    python tests/gcs_emulator.py PORT BUCKET

gcp-storage-emulator (2026.7.19) neither sends `x-goog-generation` with an object's bytes nor honours the
`ifGenerationMatch` precondition of an upload. TensorStore's GCS driver reads an object's generation from that header
and updates Orbax's OCDBT manifest (`manifest.ocdbt`) by a read-modify-write conditioned on it; without the header the
generation parses as invalid and the second write of a manifest fails with "Malformed StorageGeneration" (a checkpoint
with more than one array item, e.g. params and opt_state, cannot be saved). Real GCS does both; so does this wrapper:
downloads carry x-goog-generation, and an upload whose ifGenerationMatch differs from the object's generation (0: the
object must not exist) is refused with 412, checked and applied under one lock. That also lets the test exercise the
workdir LOCK's create-if-absent as GCS runs it.
"""
import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_lock = threading.Lock()
_insert, _download = objects.insert, objects.download


def _generation(storage, bucket: str, name: str) -> int:
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except (NotFound, KeyError, TypeError, ValueError):
        return 0


def insert(request, response, storage, *args, **kwargs):
    want = request.query.get("ifGenerationMatch")
    if not want:
        return _insert(request, response, storage, *args, **kwargs)
    name = (request.query.get("name") or [None])[0]
    if name is None and isinstance(request.data, dict):  # multipart: the name is in the JSON part
        name = (request.data.get("meta") or {}).get("name")
    with _lock:
        if name is not None and int(want[0]) != _generation(storage, request.params["bucket_name"], name):
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified "
                                                             "did not hold."}})
            return None
        return _insert(request, response, storage, *args, **kwargs)


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        gen = _generation(storage, request.params["bucket_name"], request.params["object_id"])
        if gen:
            response["x-goog-generation"] = str(gen)
            response["x-goog-metageneration"] = "1"


objects.insert, objects.download = insert, download  # before the server module builds its handler table

if __name__ == "__main__":
    import logging

    logging.disable(logging.CRITICAL)  # its "Resource not found" lines are every exists() check
    from gcp_storage_emulator.server import create_server

    port, bucket = int(sys.argv[1]), sys.argv[2]
    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
