"""The older Marple API's client: its endpoints over the transport and error mapping of
Marple DB's client (the same server family, the same token), each answer's
``{"request_time", "message"}`` envelope unwrapped and checked."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from pydantic import BaseModel, ConfigDict, TypeAdapter

from daemon.delivery.files import FileSlice, Progress, multipart_file_body
from daemon.delivery.marple_db.client import MarpleClient
from daemon.errors import ConflictError, NotFoundError, ProtocolError, RejectedError
from daemon.net.answers import parse_answer

#: The status code of an imported source; 0..99 read as percent done, negative as failed.
IMPORTED = 100


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class SourceStatus(_Model):
    """One entry of ``GET /sources/status``."""

    source_id: int
    status: int | float | str | None = None
    message: str | None = None


_STATUSES = TypeAdapter(list[SourceStatus])


class MarpleLegacyApi:
    """The older API's endpoints, over the transport and error mapping of ``MarpleClient``.

    ``MarpleClient.request`` does the request (token header, timeouts, capped reads) and maps
    statuses to our errors (403 → AuthError, 429/5xx → retryable, …); this class only unwraps
    the ``{"request_time", "message"}`` envelope and checks each ``message``.
    """

    def __init__(self, client: MarpleClient) -> None:
        self.client = client

    @property
    def base_url(self) -> str:
        return self.client.base_url

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        endpoint = f"{method} {path}"
        body = await self.client.request(
            method,
            path,
            endpoint=endpoint,
            json_body=json_body,
            params=params,
            content=content,
            headers=headers,
        )
        if not isinstance(body, dict) or "message" not in body:
            raise ProtocolError(
                'the answer lacks the {"request_time", "message"} envelope', endpoint=endpoint
            )
        return body["message"]

    async def version(self) -> str:
        """``GET /version``."""
        message = await self._request("GET", "/version")
        if not isinstance(message, str | int | float) or isinstance(message, bool):
            raise ProtocolError("version is not a string", endpoint="GET /version")
        return str(message)

    async def token_check(self) -> None:
        """``GET /``: the official clients' token check (200 with a valid token, else 403)."""
        await self._request("GET", "/")

    async def upload(
        self, folder: str, source: FileSlice, *, filename: str, progress: Progress | None = None
    ) -> None:
        """``POST /library/file/upload?path=<folder>``: the file as multipart field ``file``."""
        body, headers = multipart_file_body(source, filename=filename, progress=progress)
        ep = "POST /library/file/upload"
        message = await self._request(
            "POST", "/library/file/upload", params={"path": folder}, content=body, headers=headers
        )
        status = message.get("status") if isinstance(message, dict) else message
        if not isinstance(status, str) or status.upper() != "OK":
            shown = repr(message)[:200]
            raise RejectedError(f"the file server did not confirm the upload: {shown}", endpoint=ep)

    async def import_file(self, path: str, plugin: str) -> int:
        """``POST /library/file/import``: the source id of the (re-)imported file."""
        message = await self._request(
            "POST", "/library/file/import", json_body={"path": path, "plugin": plugin}
        )
        source_id = message.get("source_id") if isinstance(message, dict) else None
        if not _is_int(source_id):
            raise ProtocolError("the answer has no source_id", endpoint="POST /library/file/import")
        return source_id

    async def lookup(self, path: str) -> int | None:
        """``GET /sources/lookup?path=``: the source id of a path, None when it has none."""
        try:
            message = await self._request("GET", "/sources/lookup", params={"path": path})
        except NotFoundError:
            return None
        if isinstance(message, dict):
            message = message.get("source_id")
        if message is None:
            return None
        if _is_int(message):
            return message
        raise ProtocolError("the answer is not a source id", endpoint="GET /sources/lookup")

    async def statuses(self, source_ids: Sequence[int]) -> list[SourceStatus]:
        """``GET /sources/status?id=1&id=2``: the status of several sources in one request."""
        ep = "GET /sources/status"
        message = await self._request("GET", "/sources/status", params={"id": list(source_ids)})
        if isinstance(message, dict):
            message = [message]  # one id may come back as one object
        return parse_answer(_STATUSES, message, ep)

    async def add_metadata(self, source_id: int, entries: list[dict[str, Any]]) -> None:
        """``POST /library/metadata``: set name/value pairs on a source."""
        await self._request(
            "POST", "/library/metadata", json_body={"source_id": source_id, "metadata": entries}
        )

    async def new_share(self, workbook: str, source_ids: list[int]) -> str:
        """``POST /library/share/new``: a new share id for a workbook with these sources."""
        message = await self._request(
            "POST",
            "/library/share/new",
            json_body={"workbook_name": workbook, "source_ids": source_ids},
        )
        if isinstance(message, dict):
            message = message.get("share_id", message.get("id"))
        if not isinstance(message, str | int) or isinstance(message, bool) or message == "":
            raise ProtocolError("the answer is not a share id", endpoint="POST /library/share/new")
        return str(message)

    async def add_to_share(self, share_id: str, workbook: str, source_ids: list[int]) -> str:
        """``POST /library/share/{id}/add``: the *new* share id holding these sources too."""
        ep = "POST /library/share/{id}/add"
        _check_share_id(share_id, ep)
        message = await self._request(
            "POST",
            f"/library/share/{share_id}/add",
            json_body={"workbook_name": workbook, "source_ids": source_ids},
        )
        if isinstance(message, dict):
            message = message.get("share_id", message.get("id"))
        if not isinstance(message, str | int) or isinstance(message, bool) or message == "":
            raise ProtocolError("the answer is not a share id", endpoint=ep)
        return str(message)

    async def share_link(self, share_id: str, url: str = "") -> str:
        """``GET /library/share/{id}/link[?url=]``: the link that opens the workbook with its
        sources, on the base ``url`` when one is given."""
        ep = "GET /library/share/{id}/link"
        _check_share_id(share_id, ep)
        params = {"url": url} if url else None
        message = await self._request("GET", f"/library/share/{share_id}/link", params=params)
        if not isinstance(message, str) or not message:
            raise ProtocolError("the answer is not a link", endpoint=ep)
        return message

    async def add_folder(self, parent: str, name: str) -> bool:
        """``POST /library/folder/add``: make ``parent/name``. False when it exists already
        (409, or a 400 that says so: the guide does not say which a server answers)."""
        body = {"path": parent, "new_folder_name": name}
        try:
            await self._request("POST", "/library/folder/add", json_body=body)
        except ConflictError:
            return False
        except RejectedError as exc:
            if "exist" in exc.detail.lower():
                return False
            raise
        return True


def _check_share_id(share_id: str, endpoint: str) -> None:
    # The id goes into a URL path: refuse anything but a plain token.
    if not re.fullmatch(r"[\w-]{1,200}", share_id):
        raise ProtocolError(f"unusable share id {share_id!r}", endpoint=endpoint)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
