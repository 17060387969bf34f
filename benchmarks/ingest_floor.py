"""The floor for `ingest.py`: a bare ASGI app that speaks the robot upload protocol and does the unavoidable work only.

Same daphne, same clients, same bytes as the real server: ``POST /api/robot/episodes/`` announces an episode (id,
size, sha256) and answers with its upload URL and offset; ``PUT .../payload`` with ``Upload-Offset`` appends the body,
fsyncs it and answers the new offset; the request that completes the payload checks the sha256 of the whole file and
moves it into the store. A bearer token is looked up in a dict. No Django, no database, no HDF5 check, no quotas: what
is left is what any server must do to store a verified upload (docs/protocol.md), so the real server's ratio to this
floor says how much its own work costs.

    daphne benchmarks.ingest_floor:app     (SOP_DATA_DIR: where to store; SOP_FLOOR_TOKENS: a JSON file of tokens)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

DATA = Path(os.environ.get("SOP_DATA_DIR", "/tmp/sop-floor")) / "floor"
TOKENS = set(json.loads(Path(os.environ["SOP_FLOOR_TOKENS"]).read_text())) if os.environ.get("SOP_FLOOR_TOKENS") \
    else set()
ANNOUNCE = "/api/robot/episodes/"
PAYLOAD = re.compile(r"^/api/robot/episodes/([0-9a-f-]{36})/payload$")
episodes: dict[str, dict] = {}  # id -> {"size", "sha256", "received"}


async def _body(receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b" if path.exists() else "w+b") as fh:
        fh.seek(offset)
        fh.write(data)
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            pass
        return
    if scope["type"] != "http":
        return
    if scope["path"] == "/healthz":
        await _body(receive)
        return await _reply(send, 200, {"ok": True})
    headers = dict(scope["headers"])
    token = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
    if token not in TOKENS:
        await _body(receive)
        return await _reply(send, 401, {"code": "unauthorized"})
    body = await _body(receive)
    DATA.mkdir(parents=True, exist_ok=True)
    if scope["method"] == "POST" and scope["path"] == ANNOUNCE:
        meta = json.loads(body)
        ep = episodes.setdefault(meta["id"], {"size": int(meta["size"]), "sha256": meta["sha256"], "received": 0,
                                              "verified": False})
        status = "verified" if ep["verified"] else "uploading"
        return await _reply(send, 201, {"status": status, "offset": ep["received"],
                                        "upload_url": f"{ANNOUNCE}{meta['id']}/payload"})
    match = PAYLOAD.match(scope["path"])
    if scope["method"] == "PUT" and match and match.group(1) in episodes:
        ep_id = match.group(1)
        ep = episodes[ep_id]
        offset = int(headers.get(b"upload-offset", b"-1"))
        if offset != ep["received"]:
            return await _reply(send, 409, {"code": "offset_mismatch", "offset": ep["received"]})
        partial = DATA / f"{ep_id}.partial"
        _write(partial, offset, body)
        ep["received"] = offset + len(body)
        if ep["received"] == ep["size"]:
            if _sha256(partial) != ep["sha256"]:
                ep["received"] = 0
                return await _reply(send, 422, {"code": "checksum_mismatch", "offset": 0})
            os.replace(partial, DATA / f"{ep_id}.h5")
            ep["verified"] = True
            return await _reply(send, 200, {"status": "verified", "offset": ep["received"]})
        return await _reply(send, 200, {"status": "uploading", "offset": ep["received"]})
    return await _reply(send, 404, {"code": "not_found"})
