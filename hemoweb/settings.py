"""hemoweb settings: everything comes from the environment, with safe defaults for one machine.

Development default: SQLite and the ORM-backed django-q2 queue in `var/`, media in `media/`,
trained models in `models/`. Production: `DATABASE_URL=mysql://user:pass@host:3306/name` (or
`DB=mysql` with `DB_NAME`, `DB_USER`, `DB_PASSWORD`, `DB_HOST`, `DB_PORT`), `DEBUG=0`,
`SECRET_KEY` (or `SECRET_KEY_FILE`), `ALLOWED_HOSTS`.
"""

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    """A string from the environment, or from the file named by NAME_FILE (for secrets)."""
    file_name = os.environ.get(f"{name}_FILE")
    if file_name:
        return Path(file_name).read_text().strip()
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).resolve() if value else default


DEBUG = env_bool("DEBUG", True)
SECRET_KEY = env_str("SECRET_KEY", "dev-only-insecure-key" if DEBUG else "")
if not SECRET_KEY:
    raise RuntimeError("SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is off.")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

VAR_DIR = env_path("VAR_DIR", BASE_DIR / "var")
MEDIA_ROOT = env_path("MEDIA_ROOT", BASE_DIR / "media")
MEDIA_URL = "/media/"
MODELS_DIR = env_path("MODELS_DIR", BASE_DIR / "models")
STATIC_URL = "/static/"
STATIC_ROOT = env_path("STATIC_ROOT", BASE_DIR / "staticfiles")
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise looks here at start-up

INSTALLED_APPS = [
    "apps.accounts.admin_site.HemowebAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "axes",
    "simple_history",
    "apps.accounts",
    "apps.cells",
    "apps.classifiers",
    "apps.operations",
    "apps.analysis",
    "apps.detection",
    "apps.training",
    "apps.explain",
    "apps.sites",
    "apps.lis",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "apps.operations.middleware.DatabaseUnavailableMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "apps.accounts.middleware.LoginRequiredMiddleware",
    "csp.middleware.CSPMiddleware",
    "simple_history.middleware.HistoryRequestMiddleware",
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "hemoweb.urls"
WSGI_APPLICATION = "hemoweb.wsgi.application"

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
                "hemoweb.navigation.navigation",
            ],
        },
    }
]


def database_config() -> dict:
    """SQLite by default; MariaDB/MySQL from DATABASE_URL or DB=mysql + DB_* variables."""
    url = env_str("DATABASE_URL")
    if url:
        parsed = urlparse(url)
        if parsed.scheme.startswith("sqlite"):
            # sqlite:///relative/path or sqlite:////absolute/path
            return {"ENGINE": "django.db.backends.sqlite3", "NAME": parsed.path[1:] or ":memory:",
                    "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"}}
        if parsed.scheme not in {"mysql", "mariadb"}:
            raise RuntimeError(f"DATABASE_URL scheme {parsed.scheme!r} is not supported (use mysql:// or sqlite:///).")
        name, user, password = parsed.path.lstrip("/"), unquote(parsed.username or ""), unquote(parsed.password or "")
        host, port = parsed.hostname or "127.0.0.1", str(parsed.port or 3306)
    elif env_str("DB") in {"mysql", "mariadb"}:
        name, user, password = env_str("DB_NAME", "hemoweb"), env_str("DB_USER", "root"), env_str("DB_PASSWORD")
        host, port = env_str("DB_HOST", "127.0.0.1"), env_str("DB_PORT", "3306")
    else:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_path("SQLITE_PATH", VAR_DIR / "hemoweb.sqlite3"),
            # Several processes (web + qcluster) share one file: wait for locks instead of failing.
            "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"},
        }
    return {
        "ENGINE": "django.db.backends.mysql",
        "NAME": name,
        "USER": user,
        "PASSWORD": password,
        "HOST": host,
        "PORT": port,
        "CONN_MAX_AGE": env_int("DB_CONN_MAX_AGE", 60),
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {"charset": "utf8mb4", "init_command": "SET sql_mode='STRICT_TRANS_TABLES'"},
        "TEST": {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"},
    }


DATABASES = {"default": database_config()}
# django-q2's Task model has a conditional index that MariaDB/MySQL ignore; nothing of ours relies on it.
SILENCED_SYSTEM_CHECKS = ["models.W037"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # login throttling: locks a user+address after repeated failures
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = env_int("LOGIN_COOLOFF_MINUTES", 15) / 60  # hours
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "accounts/locked.html"
AXES_IPWARE_PROXY_COUNT = env_int("PROXY_COUNT", 0)

# Content-Security-Policy: everything from hemoweb itself; no inline scripts.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        # Inline style attributes (progress bar widths, box positions) are data, not code.
        "style-src": ["'self'", "'unsafe-inline'"],
        "img-src": ["'self'", "data:", "blob:"],
        "connect-src": ["'self'"],
        "font-src": ["'self'", "data:"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
    }
}

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

# Uploads: limits are checked before anything is decoded.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 10 * 1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024
DATA_UPLOAD_MAX_NUMBER_FILES = env_int("UPLOAD_MAX_FILES", 500)
HEMOWEB_UPLOAD_MAX_BYTES = env_int("UPLOAD_MAX_BYTES", 500 * 1024 * 1024)
HEMOWEB_MAX_IMAGE_PIXELS = env_int("MAX_IMAGE_PIXELS", 40_000_000)
HEMOWEB_ZIP_MAX_ENTRIES = env_int("ZIP_MAX_ENTRIES", 200_000)
HEMOWEB_ZIP_MAX_UNCOMPRESSED = env_int("ZIP_MAX_UNCOMPRESSED", 4 * 1024**3)
HEMOWEB_ZIP_MAX_RATIO = env_int("ZIP_MAX_RATIO", 200)
HEMOWEB_ZIP_MAX_ENTRY_BYTES = env_int("ZIP_MAX_ENTRY_BYTES", 64 * 1024 * 1024)
# Classification: uploads with more files than this run as a background job.
HEMOWEB_CLASSIFY_SYNC_MAX = env_int("CLASSIFY_SYNC_MAX", 300)
# Through the page, uploads of more files than this go to the worker too: the run page shows their progress at once.
HEMOWEB_CLASSIFY_PAGE_SYNC_MAX = env_int("CLASSIFY_PAGE_SYNC_MAX", 8)
# The printed report's header: the lab's name, then its address lines ("|" or new lines between them; or
# REPORT_HEADER_FILE), e.g. REPORT_HEADER="City Hospital haematology laboratory|1 Main Street, Springfield".
HEMOWEB_REPORT_HEADER = [line.strip() for line in env_str("REPORT_HEADER").replace("|", "\n").splitlines()
                         if line.strip()]
# A job queued this long that no worker has taken says on its page which worker to start.
HEMOWEB_QUEUE_HINT_SECONDS = env_int("QUEUE_HINT_SECONDS", 20)
# Where classification and explanation run: auto = a CUDA GPU when present, else cpu.
HEMOWEB_DEVICE = env_str("CLASSIFY_DEVICE", "auto")
# Decode JPEGs in batches on the classifier's device: auto = on a GPU (nvJPEG), on | off to force.
HEMOWEB_BATCH_DECODE = env_str("BATCH_DECODE", "auto")
# What runs the networks in classification: auto = ONNX Runtime on the CPU (several times faster there; exported on
# first use beside the set, hemoweb/ml/engine.py), PyTorch on a GPU; onnxruntime | torch to choose. Explanations
# always use PyTorch. Exports of a set in a read-only folder go to ONNX_CACHE_DIR.
HEMOWEB_INFERENCE_ENGINE = env_str("INFERENCE_ENGINE", "auto")
if HEMOWEB_INFERENCE_ENGINE not in ("auto", "onnxruntime", "torch"):
    raise RuntimeError(f"INFERENCE_ENGINE={HEMOWEB_INFERENCE_ENGINE!r}: use auto, onnxruntime or torch.")
HEMOWEB_ONNX_CACHE_DIR = env_path("ONNX_CACHE_DIR", VAR_DIR / "onnx")
# Threads that decode and prepare a run's next chunk while the network classifies this one (-1: the cores the
# network leaves over, at least one; 0: none, each chunk decoded before it is classified).
HEMOWEB_CLASSIFY_DECODE_WORKERS = env_int("CLASSIFY_DECODE_WORKERS", -1)
# Files decoded and stored per chunk (0: the built-in 256); a run's heartbeat is renewed after each chunk.
HEMOWEB_CLASSIFY_CHUNK = env_int("CLASSIFY_CHUNK", 0)
# Slide runs: fields detected, classified and committed together; slides with more fields run as a background job.
HEMOWEB_SLIDE_FIELD_CHUNK = env_int("SLIDE_FIELD_CHUNK", 8)
HEMOWEB_SLIDE_SYNC_MAX = env_int("SLIDE_SYNC_MAX", 20)
# Detect on fields white balanced and resampled to the detector's training fields (hemoweb.ml.fields). Off: on LISC
# it found 80 % of the white cells instead of 2 %, but took red cells for white ones (97 % of the cells found).
HEMOWEB_SLIDE_STANDARDISE = env_bool("SLIDE_STANDARDISE", False)
# A running classification whose worker has not reported for this long is taken as lost (killed worker).
HEMOWEB_CLASSIFY_STALE_SECONDS = env_int("CLASSIFY_STALE_SECONDS", 600)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 100,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_CLASSES": [
        "rest_framework.throttling.AnonRateThrottle",
        "rest_framework.throttling.UserRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env_str("API_THROTTLE_ANON", "60/min"),
        "user": env_str("API_THROTTLE_USER", "3000/min"),
    },
}
SPECTACULAR_SETTINGS = {
    "TITLE": "hemoweb API",
    "DESCRIPTION": "Cell-type tree, datasets, models, classification, explanation and detection.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Several models have a Status; name each enum after its model in the schema.
    "ENUM_NAME_OVERRIDES": {
        "ModelSetStatusEnum": "apps.classifiers.models.ModelSet.Status",
        "TrainedModelStatusEnum": "apps.classifiers.models.TrainedModel.Status",
        "RunStatusEnum": "apps.analysis.models.ClassificationRun.Status",
        "CountTargetEnum": "apps.analysis.models.ClassificationRun.TARGETS",
        "DetectorTrainingStatusEnum": "apps.detection.models.DetectorTrainingJob.Status",
        "ExplanationStatusEnum": "apps.explain.models.Explanation.Status",
        "TrainingJobStatusEnum": "apps.training.models.TrainingJob.Status",
    },
}

# Background work. ORM broker by default; Redis when several worker machines share a queue.
Q_BROKER = env_str("Q_BROKER", "orm")
Q_CLUSTER = {
    # The same for every cluster of this site: it salts the signed task packages. A worker picks its
    # queue with the env var Q_CLUSTER_NAME (django-q2 ALT_CLUSTERS), never by changing this name.
    "name": env_str("Q_SITE_NAME", "hemoweb"),
    "workers": env_int("Q_WORKERS", 2),
    "timeout": env_int("Q_TIMEOUT", 6 * 3600),
    "retry": env_int("Q_TIMEOUT", 6 * 3600) + 60,
    "max_attempts": 1,
    "ack_failures": True,
    "catch_up": False,
    "save_limit": 500,
    "label": "Background tasks",
}
if Q_BROKER == "redis":
    Q_CLUSTER["redis"] = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
else:
    Q_CLUSTER["orm"] = "default"
# Training runs on its own queue so that short jobs never wait behind it.
HEMOWEB_TRAINING_CLUSTER = env_str("TRAINING_CLUSTER", "hemoweb-training")
# CPU niceness of training jobs (0-19): on a shared machine they yield to web requests and short jobs.
HEMOWEB_TRAINING_NICE = env_int("TRAINING_NICE", 10)
# Its worker: `Q_CLUSTER_NAME=hemoweb-training python manage.py qcluster` (one worker: one job per GPU at a time).
Q_CLUSTER["ALT_CLUSTERS"] = {HEMOWEB_TRAINING_CLUSTER: {"workers": env_int("TRAINING_WORKERS", 1)}}
# A running job whose worker has not reported for this long is taken as lost (killed worker).
HEMOWEB_TRAINING_STALE_SECONDS = env_int("TRAINING_STALE_SECONDS", 900)

if not DEBUG:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("SECURE_COOKIES", True)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}, "axes": {"level": "WARNING"}},
}

# ultralytics and the model hubs: never reach the network.
YOLO_CONFIG_DIR = env_path("YOLO_CONFIG_DIR", VAR_DIR / "ultralytics")
for _name, _value in {
    "YOLO_CONFIG_DIR": str(YOLO_CONFIG_DIR),
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_name, _value)
