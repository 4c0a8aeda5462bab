"""External storage behind the sandbox: S3 (moto in tests) and Azure Blob (Azurite in tests).

Both are thin: they hand out signed URLs and, at complete time, look at what the client put
there. The S3 methods are blocking boto3 calls (the app runs them in worker threads); boto3 is
a development dependency only, so it is imported when an S3Backend is made.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, cast
from urllib.parse import quote

import httpx

from daemon.net.clients import build_client, build_sync_client
from daemon.sandbox.signing import SAS_VERSION, account_sas, blob_sas


class StorageError(Exception):
    """The storage back-end could not be reached or answered unexpectedly."""


class S3Backend:
    """Presigned S3 uploads against an S3-compatible endpoint (blocking calls)."""

    def __init__(self, endpoint: str, bucket: str) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        # Path-style addressing: an IP endpoint has no bucket sub-domains.
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106 - the emulators' dummy credentials
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    @staticmethod
    def _expires(ttl: float) -> int:
        # Presigned S3 lifetimes are whole seconds, at least one.
        return max(1, round(ttl))

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists."""
        from botocore.exceptions import ClientError

        try:
            self._client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(f"cannot create bucket {self.bucket}: {exc}") from exc

    def presign_put(self, key: str, ttl: float) -> str:
        """A presigned PUT URL for the whole object."""
        url = self._client.generate_presigned_url(
            "put_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self._expires(ttl),
        )
        return cast(str, url)

    def create_multipart(self, key: str) -> str:
        """Start a multipart upload; return its UploadId."""
        answer = self._client.create_multipart_upload(Bucket=self.bucket, Key=key)
        return cast(str, answer["UploadId"])

    def presign_part(self, key: str, upload_id: str, number: int, ttl: float) -> str:
        """A presigned UploadPart URL."""
        url = self._client.generate_presigned_url(
            "upload_part",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "UploadId": upload_id,
                "PartNumber": number,
            },
            ExpiresIn=self._expires(ttl),
        )
        return cast(str, url)

    def list_parts(self, key: str, upload_id: str) -> dict[int, tuple[int, str]]:
        """Uploaded parts: number -> (size, ETag), following ListParts pagination."""
        parts: dict[int, tuple[int, str]] = {}
        paginator = self._client.get_paginator("list_parts")
        for page in paginator.paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
            for part in page.get("Parts", []):
                parts[int(part["PartNumber"])] = (int(part["Size"]), str(part["ETag"]))
        return parts

    def complete_multipart(self, key: str, upload_id: str, etags: list[tuple[int, str]]) -> None:
        """CompleteMultipartUpload with the given (number, ETag) list."""
        self._client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in etags]},
        )

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """AbortMultipartUpload; errors are ignored (the upload may be gone already)."""
        from botocore.exceptions import BotoCoreError, ClientError

        with contextlib.suppress(BotoCoreError, ClientError):
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def object_size(self, key: str) -> int | None:
        """Size of the object, or None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return None
            raise StorageError(f"HeadObject failed: {exc}") from exc
        return int(head["ContentLength"])

    def presign_get(self, key: str, ttl: float) -> str:
        """A presigned GET URL for the object."""
        url = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self._expires(ttl)
        )
        return cast(str, url)

    def delete(self, key: str) -> None:
        """DeleteObject (S3 answers success for a key that is already gone)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"DeleteObject failed: {exc}") from exc

    def read(self, key: str) -> bytes:
        """The whole object (for tests)."""
        answer = self._client.get_object(Bucket=self.bucket, Key=key)
        return cast(bytes, answer["Body"].read())


class AzureBackend:
    """Blob service SAS URLs and the few blob calls the sandbox needs."""

    def __init__(self, account_url: str, account_name: str, account_key: str, container: str):
        self.account_url = account_url.rstrip("/")
        self.account_name = account_name
        self.account_key = account_key
        self.container = container

    def blob_url(self, blob: str, permissions: str, ttl: float) -> str:
        """URL of `blob` (an unencoded name) with a SAS granting `permissions` for `ttl` s."""
        sas = blob_sas(
            account_name=self.account_name,
            account_key=self.account_key,
            container=self.container,
            blob=blob,
            permissions=permissions,
            expiry=time.time() + ttl,
        )
        return f"{self.account_url}/{self.container}/{quote(blob, safe='/')}?{sas}"

    def ensure_container(self) -> None:
        """Create the container unless it exists (blocking)."""
        sas = account_sas(
            account_name=self.account_name,
            account_key=self.account_key,
            permissions="cw",
            resource_types="c",
            expiry=time.time() + 300,
        )
        url = f"{self.account_url}/{self.container}?restype=container&{sas}"
        try:
            with build_sync_client(timeout=10) as http:
                answer = http.put(url, headers={"x-ms-version": "2025-01-05"})
        except httpx.HTTPError as exc:
            raise StorageError(f"cannot reach Azure blob service: {exc}") from exc
        if answer.status_code not in (201, 409):
            raise StorageError(
                f"cannot create container {self.container}: {answer.status_code} {answer.text}"
            )

    async def blob_size(self, blob: str) -> int | None:
        """Size of the committed blob, or None when there is none (Get Blob Properties)."""
        url = self.blob_url(blob, "r", 300)
        try:
            async with build_client(timeout=30) as client:
                answer = await client.head(url)
        except httpx.HTTPError as exc:
            raise StorageError(f"Get Blob Properties failed: {exc}") from exc
        if answer.status_code == 404:
            return None
        if answer.status_code != 200:
            raise StorageError(f"Get Blob Properties answered {answer.status_code}")
        return int(answer.headers["content-length"])

    async def delete(self, blob: str) -> None:
        """Delete Blob; a blob that is already gone is not an error."""
        try:
            async with build_client(timeout=30) as client:
                answer = await client.delete(
                    self.blob_url(blob, "d", 300), headers={"x-ms-version": SAS_VERSION}
                )
        except httpx.HTTPError as exc:
            raise StorageError(f"Delete Blob failed: {exc}") from exc
        if answer.status_code not in (202, 404):
            raise StorageError(f"Delete Blob answered {answer.status_code}")

    def read(self, blob: str) -> bytes:
        """The whole blob (blocking; for tests)."""
        with build_sync_client(timeout=30) as http:
            answer = http.get(self.blob_url(blob, "r", 300))
        if answer.status_code != 200:
            raise StorageError(f"Get Blob answered {answer.status_code}")
        return answer.content
