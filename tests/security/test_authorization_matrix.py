"""The README's security table, checked for every route and every socket message type through a real daphne.

The routes come from walking the URL conf: a route with no entry in ``ROUTES`` fails the test, so a new page or API
cannot ship without a decision about who may use it. Each route is called with GET and POST (PUT for uploads) by
every identity: anonymous, a viewer, an operator, an admin, the robot that owns the objects in the URL, and another
robot. Socket message types come from robots/console_protocol.py and robots/protocol.py the same way.

"allowed" means authorisation passed: any answer but 401, 403, a redirect to the login page or a 5xx (a 400 for an
empty form is allowed: the request reached the view). "denied" means 401, 403 or the login redirect, and is also what
a method the route does not accept may give (or 405).
"""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
import requests
from django.conf import settings
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from learner.models import Checkpoint, TrainingRun
from robots import console_protocol as cp
from robots import fleet, helpqueue, protocol
from robots.models import Episode, Robot
from robots.pages import video_path
from robots.roles import ADMIN, OPERATOR, set_role
from tests.e2e.conftest import robot_socket, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")]

PUBLIC, VIEWER, OPERATOR_ONLY, ADMIN_ONLY, ROBOT, OWN_ROBOT = "public", "viewer", "operator", "admin", "robot", "own"
# route name -> (who may, the methods it serves). VIEWER: any console user; OWN_ROBOT: the robot owning the episode.
ROUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fleet": (VIEWER, ("GET",)),
    "robot": (VIEWER, ("GET",)),
    "tasks": (VIEWER, ("GET",)),  # POST (the task mix): admins, in EXTRA
    "task_new": (ADMIN_ONLY, ("GET", "POST")),
    "task_edit": (VIEWER, ("GET",)),  # read-only for viewers and operators; POST: admins
    "episodes": (VIEWER, ("GET",)),
    "episode": (VIEWER, ("GET",)),
    "episode_video": (VIEWER, ("GET",)),
    "episode_value": (VIEWER, ("GET",)),
    "episode_relabel": (OPERATOR_ONLY, ("POST",)),
    "training": (VIEWER, ("GET",)),
    "training_start": (ADMIN_ONLY, ("POST",)),
    "training_run": (VIEWER, ("GET",)),
    "training_run_metrics": (VIEWER, ("GET",)),
    "training_stop": (ADMIN_ONLY, ("POST",)),
    "checkpoint_evaluate": (OPERATOR_ONLY, ("POST",)),
    "checkpoint_rollback": (ADMIN_ONLY, ("POST",)),
    "metrics": (VIEWER, ("GET",)),
    "metrics_data": (VIEWER, ("GET",)),
    "audit": (VIEWER, ("GET",)),
    "data": (VIEWER, ("GET",)),
    "data_export": (OPERATOR_ONLY, ("POST",)),
    "token_create": (VIEWER, ("POST",)),  # one's own tokens, with one's own role
    "token_revoke": (VIEWER, ("POST",)),  # one's own only (another's: 404)
    "api-exports": (VIEWER, ("GET",)),  # POST: operators (EXTRA)
    "api-export": (VIEWER, ("GET",)),
    "api-export-download": (VIEWER, ("GET",)),
    "login": (PUBLIC, ("GET", "POST")),
    "healthz": (PUBLIC, ("GET",)),
    "readyz": (PUBLIC, ("GET",)),  # booleans only (tests/ops/test_observability.py)
    "prometheus": (VIEWER, ("GET",)),  # or a scraper's SOP_METRICS_TOKEN (tests/ops)
    "api-schema": (VIEWER, ("GET",)),
    "robot-episodes": (ROBOT, ("POST",)),
    "robot-episode": (OWN_ROBOT, ("GET",)),
    "robot-episode-payload": (OWN_ROBOT, ("PUT",)),
    "robot-checkpoint-file": (ROBOT, ("GET",)),
    "robot-help": (ROBOT, ("POST",)),
    "api-robots": (VIEWER, ("GET",)),
    "api-tasks": (VIEWER, ("GET",)),
    "api-episodes": (VIEWER, ("GET",)),
    "api-episode": (VIEWER, ("GET",)),
    "api-runs": (VIEWER, ("GET",)),  # POST: admins (checked separately below: one route, two levels)
    "api-run-stop": (ADMIN_ONLY, ("POST",)),
    "api-checkpoints": (VIEWER, ("GET",)),
    "admin:": (ADMIN_ONLY, ("GET",)),  # the whole Django admin: staff (admins) only (its forms: Django's own)
    "logout": (PUBLIC, ("POST",)),  # last: it ends the sessions the other checks use
}
EXTRA = {("api-runs", "POST"): ADMIN_ONLY, ("api-exports", "POST"): OPERATOR_ONLY, ("tasks", "POST"): ADMIN_ONLY, ("task_edit", "POST"): ADMIN_ONLY}

IDENTITIES = ("anonymous", "robot", "other_robot", "viewer", "operator", "admin")
RANK = {"viewer": 1, "operator": 2, "admin": 3}
LEVEL_RANK = {VIEWER: 1, OPERATOR_ONLY: 2, ADMIN_ONLY: 3}

# Console messages -> the least role that may send them (README table); CONSOLE_FORCE: a forced takeover.
CONSOLE_MESSAGES = {"ping": "viewer", "webrtc.offer": "viewer", "webrtc.close": "viewer", "takeover": "operator",
                    "keepalive": "operator", "release": "operator", "teleop": "operator", "estop": "operator",
                    "label": "operator", "help.capacity": "operator", "help.claim": "operator",
                    "help.resolve": "operator", "help.dismiss": "operator"}
CONSOLE_FORCE = "admin"
# Data channel messages (enforced by the robot, tests/robots/agent/test_webrtc.py): who may send them with effect.
CHANNEL_MESSAGES = {"cmd": "lease holder", "keepalive": "lease holder", "ping": "viewer", "trace": "viewer",
                    "estop": "operator"}


def url_patterns(resolver=None):
    """(name, pattern) of every route in the URL conf; the Django admin counts as one route, ``admin:``."""
    for p in (resolver or get_resolver()).url_patterns:
        if isinstance(p, URLResolver):
            if p.namespace == "admin":
                yield "admin:", None
            else:
                yield from url_patterns(p)
        elif isinstance(p, URLPattern):
            yield p.name or f"<unnamed {p.pattern}>", p


def route_names() -> list[str]:
    return [name for name, _ in url_patterns()]


def test_every_route_and_message_type_has_an_entry():
    missing = [name for name in route_names() if name not in ROUTES]
    assert not missing, f"routes without an entry in the authorisation table: {missing}"
    stale = set(ROUTES) - set(route_names())
    assert not stale, f"entries for routes that no longer exist: {stale}"
    assert set(CONSOLE_MESSAGES) == {m.TYPE for m in cp.BROWSER_MESSAGES}
    assert {m.TYPE for m in cp.CHANNEL_BROWSER_MESSAGES} == set(CHANNEL_MESSAGES)
    assert CONSOLE_MESSAGES["estop"] == "operator"
    assert set(protocol.ESTOP_ROLES) == {r for r in RANK if RANK[r] >= RANK[CONSOLE_MESSAGES["estop"]]}


def expected(level: str, identity: str) -> bool:
    if level == PUBLIC:
        return True
    if level in (ROBOT, OWN_ROBOT):
        return identity == "robot" or (identity == "other_robot" and level == ROBOT)
    return identity in RANK and RANK[identity] >= LEVEL_RANK[level]


def denied(reply: requests.Response) -> bool:
    """401, 403, or a redirect to a login page (the console's or the Django admin's)."""
    location = reply.headers.get("Location", "")
    return reply.status_code in (401, 403) or (
        reply.status_code in (302, 303) and (location.startswith("/login") or location.startswith("/admin/login")))


@pytest.fixture
def cast(launcher, task, robot, operator, other_operator, admin_user):
    proc, url = launcher.server()
    robot_a, token_a = robot
    robot_b, token_b = fleet.register_robot("sim-02")
    set_role(other_operator, OPERATOR)
    set_role(admin_user, ADMIN)
    episode = Episode.objects.create(robot=robot_a, task=task, status=Episode.Status.VERIFIED, payload_path="x.h5",
                                     payload_sha256="ab" * 32, started_at="2026-01-01T00:00:00Z")
    video = video_path(episode)
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(b"\0" * 64)
    run = TrainingRun.objects.create(algorithm="bc")
    weights = settings.CHECKPOINT_DIR / "authz-v1.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"w" * 32)
    Checkpoint.objects.create(version=1, run=run, algorithm="bc", path=weights.name, size=32,
                              sha256=hashlib.sha256(b"w" * 32).hexdigest())
    kwargs = {"name": robot_a.name, "episode_id": episode.pk, "run_id": run.pk, "version": 1, "export_id": 1,
              "token_id": 1}
    sessions = {}
    for identity, user in (("viewer", operator), ("operator", other_operator), ("admin", admin_user)):
        client = Client()
        client.force_login(user)
        sessions[identity] = client.cookies["sessionid"].value
    yield {"proc": proc, "url": url, "kwargs": kwargs, "sessions": sessions, "task": task, "episode": episode,
           "tokens": {"robot": token_a, "other_robot": token_b}, "robots": (robot_a, robot_b)}
    video.unlink(missing_ok=True)
    weights.unlink(missing_ok=True)


def http(cast, identity: str, method: str, path: str) -> requests.Response:
    headers, cookies = {}, {}
    if identity in ("robot", "other_robot"):
        headers["Authorization"] = f"Bearer {cast['tokens'][identity]}"
    elif identity in cast["sessions"]:
        cookies["sessionid"] = cast["sessions"][identity]
    csrf = "c" * 32
    cookies["csrftoken"] = csrf
    headers["X-CSRFToken"] = csrf
    headers["Referer"] = cast["url"] + "/"
    body, ctype = b"{}", "application/json"
    if method == "PUT":
        body, ctype = b"0123", "application/octet-stream"
        headers["Upload-Offset"] = "0"
    elif not path.startswith("/api/"):
        body, ctype = b"", "application/x-www-form-urlencoded"
    return requests.request(method, cast["url"] + path, headers={**headers, "Content-Type": ctype}, cookies=cookies,
                            data=body if method != "GET" else None, allow_redirects=False, timeout=30)


def url_of(name: str, cast) -> str:
    if name == "admin:":
        return "/admin/"
    pattern = dict(url_patterns())[name]
    needed = set(pattern.pattern.regex.groupindex)
    kwargs = {k: v for k, v in cast["kwargs"].items() if k in needed}
    if name == "task_edit":
        kwargs = {"name": cast["task"].name}
    return reverse(name, kwargs=kwargs)


def test_every_route_answers_each_identity_as_the_table_says(cast):
    wrong = []
    for name, (level, methods) in ROUTES.items():
        path = url_of(name, cast)
        for method in ("GET", "POST", "PUT"):
            if (method == "PUT" and "PUT" not in methods) or (name == "admin:" and method != "GET"):
                continue
            for identity in IDENTITIES:
                reply = http(cast, identity, method, path)
                assert reply.status_code < 500, (name, method, identity, reply.status_code, reply.text[:300])
                served = method in methods or (name, method) in EXTRA
                want = expected(EXTRA.get((name, method), level), identity) if served else None
                if name == "logout":  # it redirects everyone to the login page
                    if reply.status_code in (401, 403):
                        wrong.append(f"{identity} {method} {path}: {reply.status_code}")
                elif want is True and denied(reply):
                    wrong.append(f"{identity} {method} {path}: denied ({reply.status_code}), the table says allowed")
                elif want is False and not denied(reply) and reply.status_code != 405:
                    wrong.append(f"{identity} {method} {path}: {reply.status_code}, the table says denied")
                elif want is None and not (denied(reply) or reply.status_code in (405, 400)):
                    wrong.append(f"{identity} {method} {path}: {reply.status_code} for a method the route does "
                                 f"not serve")
    assert not wrong, "\n".join(wrong)
    assert "Traceback" not in cast["proc"].output()


# ---------------------------------------------------------------- sockets


def ws_url(cast, path: str) -> str:
    return cast["url"].replace("http", "ws") + path


def test_sockets_refuse_the_wrong_kind_of_identity_at_the_handshake(cast):
    for identity, path, headers in (
        ("anonymous", "/ws/robots/", {}),
        ("bad token", "/ws/robots/", {"Authorization": "Bearer " + "x" * 43}),
        ("a console session", "/ws/robots/", {"Cookie": f"sessionid={cast['sessions']['admin']}"}),
        ("anonymous", "/ws/console/", {}),
        ("a robot token", "/ws/console/", {"Authorization": f"Bearer {cast['tokens']['robot']}"}),
        ("a session from another origin", "/ws/console/", {"Cookie": f"sessionid={cast['sessions']['admin']}",
                                                            "Origin": "http://127.0.0.1:1"}),
    ):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(cast, path), open_timeout=20, additional_headers=headers,
                    origin=None if "Origin" in headers else cast["url"]).close()
        assert refused.value.response.status_code == 403, (identity, path)


def test_the_robot_socket_accepts_robot_messages_only_and_only_for_its_own_episodes(cast):
    robot_a, robot_b = cast["robots"]
    server_types = {cls.TYPE.value for cls in protocol.SERVER_MESSAGES}
    with robot_socket(cast["url"], cast["tokens"]["other_robot"]) as ws:
        for kind in sorted(server_types):  # what only a server sends is refused from a robot
            ws.send(json.dumps({"v": protocol.PROTOCOL_VERSION, "type": kind}))
            reply = json.loads(ws.recv(timeout=10))
            assert reply["type"] == "error" and reply["code"] in ("invalid", "unknown_type"), (kind, reply)
        for message in (protocol.ControlEstop(engaged=False, by="robot"), protocol.Welcome(
                robot=robot_a.name, heartbeat_s=1.0, server_time=1.0), protocol.ControlRelease(lease=1)):
            ws.send(protocol.encode(message))  # valid, but a server's message: refused by type
            reply = json.loads(ws.recv(timeout=10))
            assert (reply["type"], reply["code"]) == ("error", "unknown_type"), (message, reply)
        # robot A's episode is not robot B's to end
        ws.send(protocol.encode(protocol.EpisodeEnded(episode_id=str(cast["episode"].pk), steps=3, outcome="success",
                                                      ended_at=1.8e9)))
        reply = json.loads(ws.recv(timeout=10))
        assert (reply["type"], reply["code"]) == ("error", "forbidden"), reply
    assert Episode.objects.get(pk=cast["episode"].pk).robot_id == robot_a.pk
    assert {m.TYPE.value for m in protocol.ROBOT_MESSAGES}.isdisjoint(server_types)


def console(cast, identity: str):
    """The console socket of one of the cast's logged-in sessions."""
    ws = connect(ws_url(cast, "/ws/console/"), open_timeout=20, max_size=None, origin=cast["url"],
                 additional_headers={"Cookie": f"sessionid={cast['sessions'][identity]}"})
    assert json.loads(ws.recv(timeout=10))["type"] == "hello"
    return ws


def ask(ws, body: dict, n: list) -> list[dict]:
    """Send one frame and a ping; the replies in between."""
    n[0] += 1
    t = 1e7 + n[0]
    ws.send(json.dumps(body))
    ws.send(json.dumps({"type": "ping", "t": t}))
    seen = []
    while True:
        reply = json.loads(ws.recv(timeout=10))
        if reply.get("type") == "pong" and reply.get("t") == t:
            return seen
        seen.append(reply)


def refused_as_forbidden(replies: list[dict], codes=("forbidden", "not_holder")) -> bool:
    return any(r.get("type") == "error" and r.get("code") in codes for r in replies)


def test_console_messages_by_role_as_the_table_says(cast):
    robot_a, _ = cast["robots"]
    name = robot_a.name
    peer = robot_socket(cast["url"], cast["tokens"]["robot"])
    peer.send(protocol.encode(protocol.Hello(agent_version="authz")))
    episode_id = str(uuid.uuid4())
    peer.send(protocol.encode(protocol.EpisodeStarted(episode_id=episode_id, task=cast["task"].name, prompt="p",
                                                      started_at=1.8e9)))
    wait_for(lambda: Robot.objects.filter(pk=robot_a.pk, connected=True).exists(), 20, "robot online")
    wait_for(lambda: Episode.objects.filter(pk=episode_id).exists(), 20, "episode started")
    frames = {
        "ping": {"type": "ping", "t": 1},
        "webrtc.offer": {"type": "webrtc.offer", "robot": name, "session": str(uuid.uuid4()), "sdp": "v=0\r\n"},
        "webrtc.close": {"type": "webrtc.close", "robot": name, "session": str(uuid.uuid4())},
        "takeover": {"type": "takeover", "robot": name, "reason": "authz"},
        "keepalive": {"type": "keepalive", "robot": name},
        "teleop": {"type": "teleop", "robot": name, "seq": 1, "t": 1.0, "action": [0.0, 0.0, 0.0], "grip": 0.0},
        "estop": {"type": "estop", "robot": name, "engaged": True},
        "release": {"type": "release", "robot": name},
        "label": {"type": "label", "robot": name, "outcome": "failure", "episode_id": episode_id},
    }
    order = ["ping", "webrtc.offer", "webrtc.close", "takeover", "keepalive", "teleop", "estop", "release", "label",
             "help.capacity", "help.claim", "help.resolve", "help.dismiss"]
    assert set(order) == set(CONSOLE_MESSAGES)
    wrong = []
    for identity in ("viewer", "operator", "admin"):
        n = [0]
        # a fresh help request for each role: claimed, resolved (the lease ends), then dismissed (refused as closed,
        # which is not an authorisation refusal)
        request, _ = helpqueue.raise_request(robot_a, "button", f"authz {identity}")
        frames.update({
            "help.capacity": {"type": "help.capacity", "capacity": 2},
            "help.claim": {"type": "help.claim", "id": request.pk},
            "help.resolve": {"type": "help.resolve", "id": request.pk},
            "help.dismiss": {"type": "help.dismiss", "id": request.pk, "note": "authz"},
        })
        with console(cast, identity) as ws:
            for kind in order:
                replies = ask(ws, frames[kind], n)
                if kind == "estop":  # clear it again so the next message is judged on its own
                    ask(ws, {"type": "estop", "robot": name, "engaged": False}, n)
                want = RANK[identity] >= RANK[CONSOLE_MESSAGES[kind]]
                if want == refused_as_forbidden(replies) and kind != "webrtc.close":
                    wrong.append(f"{identity} {kind}: {replies} (the table says {'allowed' if want else 'denied'})")
                if kind == "label" and want:  # the episode was labelled: start the next one for the next role
                    episode_id = str(uuid.uuid4())
                    frames["label"]["episode_id"] = episode_id
                    peer.send(protocol.encode(protocol.EpisodeStarted(
                        episode_id=episode_id, task=cast["task"].name, prompt="p", started_at=1.8e9)))
                    wait_for(lambda: Episode.objects.filter(pk=episode_id).exists(), 20, "next episode")
            # a forced takeover: admins only (someone else holds the robot meanwhile)
            with console(cast, "operator" if identity != "operator" else "admin") as holder:
                held = ask(holder, frames["takeover"], [100])
                assert not refused_as_forbidden(held), held
                replies = ask(ws, {**frames["takeover"], "force": True}, n)
                want = RANK[identity] >= RANK[CONSOLE_FORCE]
                if want == refused_as_forbidden(replies, ("forbidden", "held")):
                    wrong.append(f"{identity} forced takeover: {replies}")
        wait_for(lambda: not Robot.objects.get(pk=robot_a.pk).estopped, 10, "e-stop cleared")
    peer.close()
    assert not wrong, "\n".join(wrong)
    assert "Traceback" not in cast["proc"].output()
