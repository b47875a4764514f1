"""Where record files live: local paths, or URLs (`s3://`, `gs://`, any fsspec protocol) reached
through fsspec, with errors that name the bucket or object and what to do.

Filesystem objects are made in each process (s3fs and gcsfs objects are not fork-safe) and reused
within it (fsspec caches instances per process and per `storage_options`).
"""

from __future__ import annotations

import os
import re
from typing import Any

from resumax.errors import ConfigError, DataFileNotFoundError, DataSourceError

StorageOptions = dict[str, Any] | None

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# Protocols whose libraries are optional extras: the extra that installs each.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_CREDENTIALS = {
    "s3": "AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, an "
    "instance role) or storage_options={'key': ..., 'secret': ...} (and 'endpoint_url' for an "
    "S3-compatible server)",
    "gs": "Google credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default "
    "login`, the metadata server) or storage_options={'token': ...}",
}


def protocol(path: str) -> str | None:
    """The URL scheme of `path` (`s3`, `gs`, ...), None for a local path or a `file://` URL."""
    match = _SCHEME.match(path)
    if match is None or match.group(1).lower() == "file":
        return None
    return match.group(1).lower()


def is_url(path: str) -> bool:
    """True for a path that fsspec must reach (`s3://`, `gs://`, `memory://`, ...)."""
    return protocol(path) is not None


def local_path(path: str) -> str:
    """A local path as it is, a `file://` URL as its path."""
    return path[len("file://") :] if path.lower().startswith("file://") else path


def check_storage_options(storage_options: Any) -> dict[str, Any]:
    """`storage_options` as a dict (None: empty), or ConfigError naming the value."""
    if storage_options is None:
        return {}
    if not isinstance(storage_options, dict) or not all(
        isinstance(key, str) for key in storage_options
    ):
        raise ConfigError(
            f"storage_options must be None or a dict of fsspec options such as "
            f"{{'endpoint_url': ...}}, got {storage_options!r}"
        )
    return dict(storage_options)


def filesystem(url: str, storage_options: StorageOptions = None) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL; ConfigError when the protocol's library
    is missing, naming the extra that installs it."""
    import fsspec  # the library for every protocol; imported only when a URL is used

    options = check_storage_options(storage_options)
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as error:
        scheme = protocol(url) or url
        extra = _EXTRAS.get(scheme)
        how = f"pip install 'resumax[{extra}]'" if extra else f"install fsspec's {scheme} library"
        raise ConfigError(f"reading {url!r} needs a library that is not installed: {how}") from (
            error
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"cannot use {url!r} with storage_options {options}: {error}") from error


def bucket_of(url: str) -> str:
    """The bucket (or host) part of a URL: `s3://bucket/key` -> `bucket`."""
    rest = _SCHEME.sub("", url, count=1)
    return rest.split("/", 1)[0]


def storage_error(url: str, error: BaseException, doing: str = "read") -> DataSourceError:
    """A DataSourceError for a failed access to `url`: a missing bucket or object, refused
    credentials (naming how to give them), or the cause as it came."""
    scheme = protocol(url) or "file"
    bucket = bucket_of(url)
    text = f"{type(error).__name__}: {error}"
    # The cause without the names in it: a bucket or key such as `test-403b` is no status code.
    lowered = re.sub(r"\S*/\S*", " ", text.lower()).replace(bucket.lower(), " ")
    if (
        "nosuchbucket" in lowered
        or "bucket does not exist" in lowered
        or ("not found" in lowered and "bucket" in lowered)
        # gcsfs: a 404 on the bucket's object listing (`b/<bucket>/o`), where S3 says NoSuchBucket
        or (isinstance(error, FileNotFoundError) and str(error).endswith(f"b/{bucket}/o"))
    ):
        return DataFileNotFoundError(
            f"cannot {doing} {url!r}: the bucket {bucket!r} does not exist ({text})"
        )
    refused = (
        isinstance(error, PermissionError)
        or "accessdenied" in lowered
        or "access denied" in lowered
        or "forbidden" in lowered
        or "credentials" in lowered
        or "invalidaccesskeyid" in lowered
        or "signaturedoesnotmatch" in lowered
        or re.search(r"\b40[13]\b", lowered) is not None
    )
    if refused:
        how = _CREDENTIALS.get("gs" if scheme in ("gs", "gcs") else scheme, "its credentials")
        why = (
            "no credentials were found"
            if "nocredentials" in lowered or "unable to locate credentials" in lowered
            else "access was refused"
        )
        return DataSourceError(
            f"cannot {doing} {url!r}: {why} for the bucket {bucket!r} ({text}); set {how}"
        )
    if isinstance(error, FileNotFoundError):
        return DataFileNotFoundError(f"cannot {doing} {url!r}: no such object ({text})")
    return DataSourceError(f"cannot {doing} {url!r}: {text}")


def is_persistent(error: BaseException, failure: DataSourceError) -> bool:
    """Whether retrying cannot help: a missing bucket or object, or refused credentials."""
    return (
        isinstance(failure, DataFileNotFoundError)
        or isinstance(error, PermissionError)
        or any(why in str(failure) for why in ("access was refused", "no credentials were found"))
    )


def read_bytes(url: str, storage_options: StorageOptions = None) -> bytes:
    """The whole object at `url` (a small one: an index, a dataset_info.json)."""
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except Exception as error:
        raise storage_error(url, error) from error


def join(url: str, name: str) -> str:
    """`name` in the directory of `url` (for URLs: `/`-separated)."""
    return (
        f"{url.rpartition('/')[0]}/{name}"
        if is_url(url)
        else os.path.join(os.path.dirname(url), name)
    )
