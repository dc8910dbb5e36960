"""Where datasets live: fsspec file systems (local disk, S3 through s3fs) and retries for flaky storage.

S3 endpoint and credentials come from the standard AWS environment and config files; an explicit
endpoint URL (an S3-compatible store, or a local test server) can be given. Credentials are never put in
configs or logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec

from pixelflow.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

# OSErrors a retry cannot fix: the object is not there, or we may not read it.
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests")


# Credentials that are missing or refused: retrying cannot fix them either.
PERMANENT_NAMES = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError")
PERMANENT_CODES = ("AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "(403)")


def is_transient(exc: BaseException) -> bool:
    """Storage trouble that may pass: 5xx and throttling (s3fs raises OSError for them), timeouts, dropped
    connections, and the client libraries' own network errors. Programming errors, missing or forbidden
    objects and missing or refused credentials are not."""
    if isinstance(exc, PERMANENT_OS_ERRORS) or type(exc).__name__ in PERMANENT_NAMES:
        return False
    if any(code in str(exc) for code in PERMANENT_CODES):
        return False
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in TRANSIENT_MODULES


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def storage_options(path: str, endpoint_url: str | None = None) -> dict:
    """fsspec options for a dataset path: for s3:// an optional endpoint and bounded client timeouts and
    retries (the loader retries on top, with backoff)."""
    if not path.startswith("s3://"):
        return {}
    options: dict = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3}}}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    return options


def filesystem(path: str, **options) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local directory or an fsspec URL such as s3://bucket/prefix."""
    fs, root = fsspec.core.url_to_fs(path, **options)
    return fs, root.rstrip("/")


def with_retries(action: Callable[[], T], what: str, attempts: int = 5, wait: float = 0.5) -> T:
    """Run action, retrying transient failures (5xx, throttling, timeouts, dropped connections) with
    exponential backoff; permanent ones (missing, forbidden) and the last failure raise at once."""
    attempt = 1
    while True:
        try:
            return action()
        except Exception as exc:
            if not is_transient(exc):
                if type(exc).__name__ in PERMANENT_NAMES or any(code in str(exc) for code in PERMANENT_CODES):
                    raise StorageError(f"{what}: access refused: {type(exc).__name__}: {first_line(exc)}") from None
                raise
            if attempt >= attempts:
                raise StorageError(
                    f"{what}: failed after {attempts} attempts: {type(exc).__name__}: {first_line(exc)}"
                ) from None
            delay = min(wait * 2 ** (attempt - 1), 30.0)
            log.warning("%s: %s; retrying in %.1fs (%d/%d)", what, type(exc).__name__, delay, attempt, attempts)
            time.sleep(delay)
            attempt += 1
