"""Where monitor reports are kept and the links people open.

Reports are always written to the run's local artifact directory. With ``MLPLATFORM_REPORTS_S3_URI``
(``s3://bucket/prefix``) they are also uploaded to the object store under
``<prefix>/<path relative to the artifact root>`` (endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
/ ``MLFLOW_S3_ENDPOINT_URL``, credentials from the usual AWS variables), which is what a platform with
ephemeral workers needs. Links:

* ``MLPLATFORM_REPORTS_BASE_URL`` set (an S3 website, a proxy in front of the bucket or of the directory):
  ``<base>/<relative path>``;
* S3 without a base URL: a presigned GET URL (valid ``PRESIGN_SECONDS``, the S3 maximum of 7 days);
* otherwise ``file://`` (the local default: opens on the machine that ran the task).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

S3_URI_ENV = "MLPLATFORM_REPORTS_S3_URI"
BASE_URL_ENV = "MLPLATFORM_REPORTS_BASE_URL"
PRESIGN_SECONDS = 7 * 24 * 3600
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".json": "application/json"}


def _relative(artifact_root: str | Path, path: Path) -> str | None:
    try:
        return path.resolve().relative_to(Path(artifact_root).resolve()).as_posix()
    except ValueError:
        return None


def _s3_client():
    import boto3

    endpoint = next((os.environ[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
                     if os.environ.get(k)), None)
    return boto3.client("s3", endpoint_url=endpoint)


def publish(artifact_root: str | Path, paths: list[str | Path]) -> dict[str, str]:
    """Upload ``paths`` when S3 is configured; return local path -> the link to show for each."""
    base = os.environ.get(BASE_URL_ENV, "").strip().rstrip("/")
    s3_uri = os.environ.get(S3_URI_ENV, "").strip()
    client = bucket = prefix = None
    if s3_uri:
        parsed = urlparse(s3_uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"{S3_URI_ENV}={s3_uri!r}: expected s3://bucket[/prefix]")
        client, bucket, prefix = _s3_client(), parsed.netloc, parsed.path.strip("/")
    links = {}
    for raw in paths:
        path = Path(raw)
        rel = _relative(artifact_root, path) or path.name
        if client is not None:
            key = f"{prefix}/{rel}" if prefix else rel
            client.upload_file(str(path), bucket, key,
                               ExtraArgs={"ContentType": CONTENT_TYPES.get(path.suffix, "application/octet-stream")})
            log.info("report uploaded to s3://%s/%s", bucket, key)
            links[str(raw)] = f"{base}/{rel}" if base else client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS)
        else:
            links[str(raw)] = f"{base}/{rel}" if base and _relative(artifact_root, path) else path.resolve().as_uri()
    return links
