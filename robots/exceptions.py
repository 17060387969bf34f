"""Errors of the fleet app: small classes with a stable code, a status and a default message (like DRF's)."""

from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.views import exception_handler


class SopError(APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid"
    default_detail = "Invalid request."


class UnknownTask(SopError):
    default_code = "unknown_task"
    default_detail = "No such task."


class ForbiddenEpisode(SopError):
    status_code = status.HTTP_403_FORBIDDEN
    default_code = "forbidden"
    default_detail = "This episode belongs to another robot."


class EpisodeConflict(SopError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"
    default_detail = "This episode was already stored with different content."


class OffsetMismatch(SopError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "offset_mismatch"
    default_detail = "Upload offset does not match the bytes received."


class PayloadTooLarge(SopError):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "too_large"
    default_detail = "Payload too large."


class ChecksumMismatch(SopError):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "checksum_mismatch"
    default_detail = "The uploaded bytes do not match the announced sha256; upload again."


class InvalidPayload(SopError):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "invalid_payload"
    default_detail = "The uploaded file is not a valid episode."


def api_exception_handler(exc, context):
    """DRF's handler, plus a stable ``code`` field on every error body: ``{"code": ..., "detail": ...}``."""
    response = exception_handler(exc, context)
    if response is not None and isinstance(response.data, dict) and "detail" in response.data:
        codes = exc.get_codes() if hasattr(exc, "get_codes") else None
        response.data = {"code": codes if isinstance(codes, str) else "invalid", "detail": str(response.data["detail"])}
    return response
