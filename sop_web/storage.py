"""One storage interface for what outlives a process: verified episode payloads, checkpoints, trainer states.

Two backends, chosen by ``SOP_STORAGE`` (docs/deploy.md "Storage"):

- ``local`` (the embedded default): files under SOP_DATA_DIR, read in place. Several hosts share them only through
  a shared file system.
- ``s3``: an S3-compatible bucket through django-storages (AWS, MinIO, Ceph, R2, ...). SOP_DATA_DIR then holds each
  host's cache: a reader works on a local file, downloaded once and checked against the size and sha256 the database
  recorded when the bytes were verified, never over the network per frame. Robots download checkpoints from a
  signed URL the bucket serves (the web node answers their request with a redirect), not through Python.

A key names the area and the path in it, the same in both backends (``payloads/episodes/ab/<uuid>.h5`` under
PAYLOAD_DIR, ``checkpoints/policy-v3-<tag>.safetensors`` and ``checkpoints/runs/<uid>/trainer.safetensors`` under
CHECKPOINT_DIR; both are in SOP_DATA_DIR): a local deployment's files are where they always were, and moving one
to a bucket is ``aws s3 sync $SOP_DATA_DIR/payloads/episodes s3://bucket/payloads/episodes`` (and the same for
checkpoints). The code path is the same for both backends; ``is_remote()``
only adds an upload after a local write and a download before a local read.

Objects are immutable except trainer states (one per run, rewritten every round), which ``pull_mutable`` refreshes
by ETag.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Optional

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class StorageError(OSError):
    """The object is missing, or what came back is not what was stored (size or sha256 differ)."""


def is_remote() -> bool:
    return settings.SOP_STORAGE == "s3"


def validate_key(key: str) -> str:
    """A key is a relative POSIX path without ``..``, ``.`` or empty parts: never a way out of SOP_DATA_DIR."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\0" in key:
        raise ValueError(f"not a storage key: {key!r}")
    return key


def areas() -> dict[str, Path]:
    """The top-level folders of the key space and where they are on this host."""
    return {"payloads": Path(settings.PAYLOAD_DIR), "checkpoints": Path(settings.CHECKPOINT_DIR),
            # replays made from the episodes (robots/replay.py): the MP4s and the value plots
            "videos": Path(settings.DATA_DIR) / "videos", "values": Path(settings.DATA_DIR) / "values",
            # datasets exported for download (robots/exports.py)
            "exports": Path(settings.DATA_DIR) / "exports"}


def local_path(key: str) -> Path:
    """Where the object lives on this host: the file itself (local) or its cache copy (s3)."""
    area, _, rest = validate_key(key).partition("/")
    if area not in areas() or not rest:
        raise ValueError(f"not a storage key: {key!r} (keys start with one of {', '.join(areas())})")
    return areas()[area] / rest


def episode_key(payload_path: str) -> str:
    """The key of a verified episode from its row's ``payload_path`` (relative to PAYLOAD_DIR)."""
    return f"payloads/{payload_path}"


def checkpoint_key(name: str) -> str:
    """The key of a checkpoint file from its row's ``path`` (relative to CHECKPOINT_DIR)."""
    return f"checkpoints/{name}"


def key_of(path: Path) -> str:
    """The key of a file in one of the areas (PAYLOAD_DIR, CHECKPOINT_DIR)."""
    resolved = Path(path).resolve()
    for area, folder in areas().items():
        try:
            return f"{area}/{resolved.relative_to(folder.resolve()).as_posix()}"
        except ValueError:
            continue
    raise ValueError(f"{path} is not in the episode or checkpoint store")


# ---------------------------------------------------------------------------------------------------- writing


def upload(key: str, source: Path) -> None:
    """Copy ``source`` to the bucket under ``key`` (s3; nothing to do for local, where the file is the object).
    Multipart for large files (boto3's transfer manager); the object appears whole or not at all."""
    if not is_remote():
        return
    from botocore.exceptions import BotoCoreError, ClientError

    validate_key(key)
    try:
        with open(source, "rb") as fh:
            _bucket().upload_fileobj(fh, _remote_name(key))
    except (BotoCoreError, ClientError) as exc:
        raise StorageError(f"could not store {key} in the bucket: {exc}") from exc


def place(key: str, source: Path) -> Path:
    """Move ``source`` (a file on the same file system as SOP_DATA_DIR) to ``local_path(key)`` atomically: the
    object itself (local) or its cache copy (s3, after ``upload``). Returns the destination."""
    dest = local_path(key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, dest)
    return dest


def delete(key: str) -> None:
    """Remove the object (and this host's copy). Missing is fine."""
    local_path(key).unlink(missing_ok=True)
    if is_remote():
        _bucket().Object(_remote_name(key)).delete()


# ---------------------------------------------------------------------------------------------------- reading


def ensure_local(key: str, *, sha256: Optional[str] = None, size: Optional[int] = None) -> Path:
    """A local file holding the immutable object ``key``. Local backend: the file itself (the caller's reader reports
    a missing file). S3: the cache copy, downloaded on first use into a temporary file and renamed into place only
    when its size and sha256 match the expected ones (given: always, for episodes and checkpoints), so a torn or
    corrupted transfer is never read. A cache copy of the wrong size is fetched again."""
    dest = local_path(key)
    if not is_remote():
        return dest
    if dest.exists() and (size is None or dest.stat().st_size == size):
        return dest
    _download(key, dest, sha256=sha256, size=size)
    return dest


def pull_mutable(key: str) -> Optional[Path]:
    """The newest copy of a mutable object (a run's trainer state), or None when there is none. S3: downloaded again
    when the bucket's ETag differs from the one recorded beside the cached copy (a rewrite within the same second
    changes it; a modification time would not); a cached copy whose object is gone is removed (another host may
    have finished the run)."""
    dest = local_path(key)
    if not is_remote():
        return dest if dest.exists() else None
    head = _head(key)
    if head is None:
        dest.unlink(missing_ok=True)
        _etag_path(dest).unlink(missing_ok=True)
        return None
    if dest.exists() and _read_etag(dest) == head.e_tag:
        return dest
    _download(key, dest, size=int(head.content_length))
    _etag_path(dest).write_text(head.e_tag)
    return dest


def push_mutable(key: str, source: Path) -> None:
    """Upload a rewritten mutable object and record its ETag beside the local copy, so that ``pull_mutable`` on this
    host does not fetch back what it just wrote."""
    if not is_remote():
        return
    upload(key, source)
    head = _head(key)
    if head is not None:
        _etag_path(source).write_text(head.e_tag)


def _etag_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.etag")


def _read_etag(path: Path) -> Optional[str]:
    try:
        return _etag_path(path).read_text()
    except OSError:
        return None


def list_keys(prefix: str) -> list[tuple[str, float]]:
    """(key, modification time) of the objects directly under ``prefix`` (a folder key): for orphan cleanup."""
    area, _, rest = validate_key(prefix).partition("/")
    if area not in areas():
        raise ValueError(f"not a storage folder: {prefix!r}")
    if not is_remote():
        folder = areas()[area] / rest if rest else areas()[area]
        out = []
        for path in folder.glob("*") if folder.is_dir() else ():
            try:
                if path.is_file():
                    out.append((f"{prefix}/{path.name}", path.stat().st_mtime))
            except FileNotFoundError:
                continue
        return out
    remote = _remote_name(prefix) + "/"
    out = []
    for obj in _bucket().objects.filter(Prefix=remote):
        rest = obj.key[len(remote):]
        if rest and "/" not in rest:
            out.append((f"{prefix}/{rest}", obj.last_modified.timestamp()))
    return out


def download_url(key: str, filename: str) -> Optional[str]:
    """A signed URL the bucket serves ``key`` from (SOP_S3_URL_EXPIRE_S seconds), or None for the local backend
    (the caller streams the file, or hands it to nginx by X-Accel-Redirect)."""
    if not is_remote():
        return None
    return _storage().url(validate_key(key), parameters={
        "ResponseContentDisposition": f'attachment; filename="{filename}"',
    })


def check() -> None:
    """Readiness: the local area is writable and (s3) the bucket answers."""
    for folder in (Path(settings.PAYLOAD_DIR), Path(settings.CHECKPOINT_DIR)):
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".readyz-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    if is_remote():
        _bucket().meta.client.head_bucket(Bucket=settings.SOP_S3_BUCKET)


# ---------------------------------------------------------------------------------------------------- the bucket


@functools.cache
def _storage():
    from storages.backends.s3 import S3Storage

    return S3Storage(
        bucket_name=settings.SOP_S3_BUCKET,
        endpoint_url=settings.SOP_S3_ENDPOINT_URL or None,
        region_name=settings.SOP_S3_REGION or None,
        location=settings.SOP_S3_PREFIX,
        file_overwrite=True,
        querystring_auth=True,
        querystring_expire=settings.SOP_S3_URL_EXPIRE_S,
        default_acl=None,
        signature_version="s3v4",
    )


@receiver(setting_changed)
def _reset(setting: str, **kwargs) -> None:
    if setting.startswith("SOP_S3_") or setting == "SOP_STORAGE":
        _storage.cache_clear()


def _bucket():
    return _storage().bucket


def _remote_name(key: str) -> str:
    """The object's key in the bucket (under SOP_S3_PREFIX)."""
    prefix = settings.SOP_S3_PREFIX
    return f"{prefix}/{validate_key(key)}" if prefix else validate_key(key)


def _head(key: str):
    from botocore.exceptions import ClientError

    obj = _bucket().Object(_remote_name(key))
    try:
        obj.load()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return obj


def _read(body, key: str) -> bytes:
    from botocore.exceptions import BotoCoreError

    try:
        return body.read(CHUNK)
    except BotoCoreError as exc:
        raise StorageError(f"could not fetch {key}: {exc}") from exc


def _download(key: str, dest: Path, *, sha256: Optional[str] = None, size: Optional[int] = None) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        try:
            body = _bucket().Object(_remote_name(key)).get()["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise StorageError(f"{key} is not in the bucket") from None
            raise StorageError(f"could not fetch {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"could not fetch {key}: {exc}") from exc
        digest, received = hashlib.sha256(), 0
        with open(part, "wb") as fh:
            for chunk in iter(lambda: _read(body, key), b""):
                received += len(chunk)
                if size is not None and received > size:
                    raise StorageError(f"{key}: more than the expected {size} bytes")
                digest.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        if size is not None and received != size:
            raise StorageError(f"{key}: {received} bytes, expected {size}")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise StorageError(f"{key}: sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(part, dest)
        log.info("fetched %s from the bucket (%d bytes)", key, received)
    finally:
        part.unlink(missing_ok=True)
