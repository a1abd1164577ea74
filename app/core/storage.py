"""Object storage behind one interface: `s3://bucket/key` through boto3 (AWS, MinIO, SeaweedFS) and `file:///path`
for the embedded default. The API uses it for headers (ranged reads), presigned URLs and deletes; workers for
downloads and uploads."""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from app.core.config import Settings


class StorageError(Exception):
    """A storage failure that retrying will not fix (denied, malformed)."""


class NotFound(StorageError):
    pass


class TransientStorageError(Exception):
    """A failure worth retrying with backoff: the server is down, throttling or answered 5xx."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    version: str = ""  # ETag or mtime: the same uri, size and version are taken to be the same bytes


def join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *(p.strip("/") for p in parts)])


def check_uri(uri: str) -> str:
    """Accept only canonical s3:// and file:// URIs: lowercase scheme, no host for files, no empty, '.' or '..'
    segments, no query. One spelling per object, so prefix checks on the string are sound."""
    scheme, sep, _ = uri.partition("://")
    if not sep or scheme not in ("s3", "file"):
        raise StorageError(f"{uri}: only s3:// and file:// URIs are supported")
    parsed = urlparse(uri)
    if scheme == "s3" and not parsed.netloc:
        raise StorageError(f"{uri}: an s3:// URI names a bucket")
    if scheme == "file" and parsed.netloc:
        raise StorageError(f"{uri}: a file:// URI is file:///absolute/path, without a host")
    if parsed.query or parsed.fragment or parsed.params:
        raise StorageError(f"{uri}: a URI here has no query or fragment")
    segments = parsed.path.split("/")[1:]
    if segments[-1:] == [""]:
        segments = segments[:-1]
    if any(part in ("", ".", "..") for part in segments):
        raise StorageError(f"{uri}: empty, '.' and '..' path segments are not allowed")
    return uri


def within(uri: str, prefix: str) -> bool:
    return uri.rstrip("/") == prefix.rstrip("/") or uri.startswith(prefix.rstrip("/") + "/")


class Storage(ABC):
    @abstractmethod
    def size(self, uri: str) -> int: ...

    @abstractmethod
    def read_range(self, uri: str, start: int, length: int) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects under a folder-like prefix, recursively, sorted by URI."""

    @abstractmethod
    def download(self, uri: str, dest: Path) -> None: ...

    @abstractmethod
    def upload(self, src: Path, uri: str) -> None: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int: ...

    @abstractmethod
    def presign(self, uri: str) -> str | None:
        """A URL a client can GET without credentials, or None where the API serves the file itself."""

    @abstractmethod
    def healthy(self, prefix: str) -> bool:
        """The prefix's bucket or folder is reachable (for /readyz)."""


class FileStorage(Storage):
    """file:// URIs; the caller decides which roots a request may touch."""

    @staticmethod
    def _path(uri: str) -> Path:
        return Path(urlparse(uri).path)

    def size(self, uri: str) -> int:
        path = self._path(uri)
        if not path.is_file():
            raise NotFound(f"{uri}: no such file")
        return path.stat().st_size

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        try:
            with self._path(uri).open("rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such file") from None

    def list(self, prefix: str) -> list[ObjectInfo]:
        root = self._path(prefix)
        if root.is_file():
            return [self._info(root)]
        if not root.is_dir():
            return []
        return [self._info(p) for p in sorted(root.rglob("*")) if p.is_file()]

    @staticmethod
    def _info(path: Path) -> ObjectInfo:
        stat = path.stat()
        return ObjectInfo(path.as_uri(), stat.st_size, str(stat.st_mtime_ns))

    def download(self, uri: str, dest: Path) -> None:
        src = self._path(uri)
        if not src.is_file():
            raise NotFound(f"{uri}: no such file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def upload(self, src: Path, uri: str) -> None:
        dest = self._path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.uploading")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)

    def delete_prefix(self, prefix: str) -> int:
        root = self._path(prefix)
        if root.is_file():
            root.unlink()
            return 1
        if not root.is_dir():
            return 0
        count = sum(1 for p in root.rglob("*") if p.is_file())
        shutil.rmtree(root)
        return count

    def presign(self, uri: str) -> str | None:
        return None

    def healthy(self, prefix: str) -> bool:
        path = self._path(prefix)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(path, os.W_OK)


class S3Storage(Storage):
    def __init__(self, settings: Settings):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self._client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, signature_version="s3v4",
                          s3={"addressing_style": "path"}))
        self._transfer = TransferConfig(multipart_threshold=settings.s3_multipart_threshold,
                                        multipart_chunksize=settings.s3_multipart_threshold)
        self._expiry = settings.s3_presign_expiry_s

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        return parsed.netloc, parsed.path.lstrip("/")

    def _call(self, fn, *args, uri: str, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "404", "NoSuchBucket", "NotFound"):
                raise NotFound(f"{uri}: not found ({code})") from None
            if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                raise TransientStorageError(f"{uri}: {code or status}") from exc
            raise StorageError(f"{uri}: {code}: {exc}") from None
        except EndpointConnectionError as exc:
            raise TransientStorageError(f"{uri}: storage unreachable: {exc}") from exc
        except BotoCoreError as exc:
            raise TransientStorageError(f"{uri}: {exc}") from exc

    def size(self, uri: str) -> int:
        bucket, key = self._split(uri)
        return int(self._call(self._client.head_object, Bucket=bucket, Key=key, uri=uri)["ContentLength"])

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        bucket, key = self._split(uri)
        if length <= 0:
            return b""
        body = self._call(self._client.get_object, Bucket=bucket, Key=key,
                          Range=f"bytes={start}-{start + length - 1}", uri=uri)["Body"]
        return body.read()

    def list(self, prefix: str) -> list[ObjectInfo]:
        bucket, key = self._split(prefix)
        folder = key.rstrip("/") + "/" if key else ""
        out: list[ObjectInfo] = []
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call(lambda: list(paginator.paginate(Bucket=bucket, Prefix=folder)), uri=prefix)
        for page in pages:
            out += [ObjectInfo(f"s3://{bucket}/{o['Key']}", int(o["Size"]), o.get("ETag", ""))
                    for o in page.get("Contents", [])]
        if not out and key:
            try:
                head = self._call(self._client.head_object, Bucket=bucket, Key=key, uri=prefix)
            except NotFound:
                return []
            return [ObjectInfo(prefix, int(head["ContentLength"]), head.get("ETag", ""))]
        return sorted(out, key=lambda o: o.uri)

    def download(self, uri: str, dest: Path) -> None:
        bucket, key = self._split(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._call(self._client.download_file, bucket, key, str(dest), Config=self._transfer, uri=uri)

    def upload(self, src: Path, uri: str) -> None:
        bucket, key = self._split(uri)
        self._call(self._client.upload_file, str(src), bucket, key, Config=self._transfer, uri=uri)

    def delete_prefix(self, prefix: str) -> int:
        objects = self.list(prefix)
        bucket, _ = self._split(prefix)
        for start in range(0, len(objects), 1000):
            keys = [{"Key": self._split(o.uri)[1]} for o in objects[start:start + 1000]]
            self._call(self._client.delete_objects, Bucket=bucket, Delete={"Objects": keys}, uri=prefix)
        return len(objects)

    def presign(self, uri: str) -> str | None:
        bucket, key = self._split(uri)
        return self._call(self._client.generate_presigned_url, "get_object",
                          Params={"Bucket": bucket, "Key": key}, ExpiresIn=self._expiry, uri=uri)

    def healthy(self, prefix: str) -> bool:
        try:
            self._client.head_bucket(Bucket=self._split(prefix)[0])
            return True
        except Exception:
            return False


class Storages:
    """Routes a URI to the backend of its scheme."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._file = FileStorage()
        self._s3: S3Storage | None = None

    def for_uri(self, uri: str) -> Storage:
        scheme = urlparse(check_uri(uri)).scheme
        if scheme == "file":
            return self._file
        if self._s3 is None:
            self._s3 = S3Storage(self.settings)
        return self._s3

    @property
    def default(self) -> Storage:
        return self.for_uri(self.settings.storage_url)
