"""Words for outcomes: what a person should do about a failure (``what_to_do``) and how a
version of a delivered file was delivered (``change_note``). Shared by the engine, which writes
them into jobs, and the commands, which show them; imports no stage."""

from __future__ import annotations

from typing import Any


def change_note(
    change: str | None, target: str, refs: dict[str, Any], remote_id: int | None
) -> str | None:
    """One phrase for ``Job.change``: how a version of a delivered file was delivered."""
    if change is None:
        return None
    where = where_delivered({"target": target, "target_refs": refs, "dataset_id": remote_id})
    if change == "appended":
        return f"appended: delivered again into {where}"
    if change == "unchanged":
        return f"content unchanged: nothing to upload ({where} holds it)"
    if change == "on_server":
        return (
            f"already on the server as {where} (same name, size and modification time):"
            " not uploaded again"
        )
    return change


#: What a person does about a job that failed with this ``error_kind``.
_TO_DO = {
    "empty_file": "write data into the file or remove it (a changed file is taken again)",
    "file_vanished": "nothing if it was deleted on purpose; else put it back (taken as new)",
    "file": "make the file readable by the inboxd user, then `inboxd retry {id}`",
    "import": "check the file (format, plugin) on the server, then `inboxd retry {id}`",
    "name_clash": "rename the file or set [upload] on_name_clash, then `inboxd retry {id}`",
    "not_found": "fix the stream in the config (`inboxd check` lists them), then "
    "`inboxd retry {id}`",
    "rejected": "read the reason: the server refused the request; fix it, then `inboxd retry {id}`",
    "auth": "put a valid token in place (/etc/inboxd/token, then `sudo systemctl restart "
    "inboxd`, or [api] token_file); uploads resume by themselves within 30 s",
    "held": "nothing: uploads resume by themselves when the service answers; if it lasts, "
    "check the network and the service",
    "disk_low": "free space on the inbox's disk",
}


def what_to_do(kind: str, job_id: int | None) -> str:
    """One sentence: what a person should do about an outcome of this kind."""
    text = _TO_DO.get(kind, "fix the cause named in the reason, then `inboxd retry {id}`")
    return text.format(id=job_id if job_id is not None else "ID")


def where_delivered(job: dict[str, Any]) -> str:
    """Where a delivered file went, in the target's own terms."""
    refs = job.get("target_refs") or {}
    if job.get("target") == "marple":
        link = f", {refs['share_link']}" if refs.get("share_link") else ""
        return f"source {job['dataset_id']}{link}"
    if job.get("target") == "data-service" and refs.get("data_source"):
        return f"data source {refs['data_source']}"
    return f"dataset {job['dataset_id']}"
