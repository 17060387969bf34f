"""Errors of the fleet app: small classes with a stable code, a status and a default message (like DRF's).

Services raise them; the API answers ``{"code": ..., "detail": ...}`` (plus a class's extra fields, e.g. ``offset``)
and the robot socket answers a protocol ``error`` message with ``protocol_code``.
"""

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.exceptions import APIException
from rest_framework.response import Response
from rest_framework.views import exception_handler

log = logging.getLogger(__name__)


class SopError(APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid"
    default_detail = "Invalid request."
    protocol_code = "invalid"  # the protocol.ErrorCode sent when this happens on the robot socket

    def __init__(self, detail=None, code=None, **extra):
        super().__init__(detail, code)
        self.extra = extra  # added to the error body, e.g. offset=... for offset_mismatch


class UnknownTask(SopError):
    default_code = "unknown_task"
    default_detail = "No such task."


class ForbiddenEpisode(SopError):
    status_code = status.HTTP_403_FORBIDDEN
    default_code = "forbidden"
    default_detail = "This episode belongs to another robot."
    protocol_code = "forbidden"


class EpisodeNotFound(SopError):
    status_code = status.HTTP_404_NOT_FOUND
    default_code = "not_found"
    default_detail = "No such episode."


class EpisodeConflict(SopError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"
    default_detail = "This episode was already stored with different content."


class UploadNotOpen(SopError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "upload_not_open"
    default_detail = "No upload is open for this episode: announce it with POST /api/robot/episodes/ first."


class OffsetMismatch(SopError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "offset_mismatch"
    default_detail = "Upload offset does not match the bytes received."


class PayloadTooLarge(SopError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "too_large"
    default_detail = "Payload too large."


class UploadBusy(SopError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "upload_busy"
    default_detail = "Another request is writing this upload right now; retry in a moment."


class QuotaExceeded(SopError):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "quota_exceeded"
    default_detail = "This robot holds too many unfinished uploads on the server."


class StorageFull(SopError):
    status_code = status.HTTP_507_INSUFFICIENT_STORAGE
    default_code = "storage_full"
    default_detail = "The server's payload store is full; the chunk was not stored. Retry later."


class StorageUnavailable(SopError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "storage_unavailable"
    default_detail = "The episode store (object storage) did not answer; nothing was lost. Retry later."


class ChecksumMismatch(SopError):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "checksum_mismatch"
    default_detail = "The uploaded bytes do not match the announced sha256; upload again."


class InvalidPayload(SopError):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "invalid_payload"
    default_detail = "The uploaded file is not a valid episode."


def api_exception_handler(exc, context):
    """Every API error body is ``{"code": str, "detail": str}`` (+ extra fields); never a traceback."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    response = exception_handler(exc, context)
    if response is None:
        # Not an API error: a bug or an outage. Log it with its traceback; the client gets a plain 500.
        view = context.get("view")
        log.exception("unhandled error in %s", type(view).__name__ if view else "API view", exc_info=exc)
        return Response({"code": "server_error", "detail": "Internal server error."}, status=500)
    if isinstance(exc, exceptions.ValidationError):
        response.data = {"code": "invalid", "detail": _flatten(exc.detail), "fields": exc.detail}
    else:
        codes = exc.get_codes()
        response.data = {"code": codes if isinstance(codes, str) else "invalid", "detail": str(exc.detail)}
    response.data.update(getattr(exc, "extra", None) or {})
    return response


def _flatten(detail, path=()) -> str:
    """``{"interventions": {0: {"end": ["..."]}}}`` -> ``"interventions.0.end: ..."``: one readable line."""
    if isinstance(detail, dict):
        return "; ".join(_flatten(value, (*path, str(key))) for key, value in detail.items())
    if isinstance(detail, list):
        return "; ".join(_flatten(value, path) for value in detail if value)
    name = ".".join(path)
    return f"{name}: {detail}" if name else str(detail)
