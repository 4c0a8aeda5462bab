"""Signed URLs: the sandbox's own storage URLs and hand-made Azure SAS tokens.

Local storage URLs carry `exp` (unix time, millisecond precision so tests can use a URL
lifetime well under a second) and `sig` = HMAC-SHA256 over "path\\nexp" with a secret made
fresh for every run, so a URL from a previous run never works.

Azure SAS tokens follow the documented string-to-sign of version 2020-12-06 and later (checked
against Azurite's validator): no azure-storage-blob dependency.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from datetime import datetime
from urllib.parse import quote, urlencode

from daemon.compat import UTC

#: The SAS version the sandbox signs with.
SAS_VERSION = "2025-01-05"


class UrlSigner:
    """Signs and checks the sandbox's `/storage/...` URLs."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)

    def _mac(self, path: str, exp: str) -> str:
        return hmac.new(self._secret, f"{path}\n{exp}".encode(), hashlib.sha256).hexdigest()

    def sign(self, path: str, ttl: float, now: float | None = None) -> str:
        """Return the query string (without '?') that authorises PUT to `path` for `ttl` s."""
        exp = f"{(time.time() if now is None else now) + ttl:.3f}"
        return urlencode({"exp": exp, "sig": self._mac(path, exp)})

    def check(self, path: str, exp: str | None, sig: str | None) -> str | None:
        """Return None when valid, else "missing", "signature" or "expired"."""
        if not exp or not sig:
            return "missing"
        if not hmac.compare_digest(self._mac(path, exp), sig):
            return "signature"
        try:
            expires = float(exp)
        except ValueError:
            return "signature"
        if time.time() >= expires:
            return "expired"
        return None


def _azure_time(unix: float) -> str:
    # SAS times are ISO 8601 in UTC, whole seconds; round up so the URL never dies early.
    return datetime.fromtimestamp(math.ceil(unix), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hmac_b64(key_b64: str, text: str) -> str:
    key = base64.b64decode(key_b64)
    return base64.b64encode(hmac.new(key, text.encode(), hashlib.sha256).digest()).decode()


def blob_sas(
    *,
    account_name: str,
    account_key: str,
    container: str,
    blob: str,
    permissions: str,
    expiry: float,
) -> str:
    """Return a blob service SAS query string (sr=b) for the *unencoded* blob name."""
    se = _azure_time(expiry)
    resource = f"/blob/{account_name}/{container}/{blob}"
    # Order per "Create a service SAS", version 2020-12-06 and later: sp, st, se, resource,
    # si, sip, spr, sv, sr, snapshot time, ses, rscc, rscd, rsce, rscl, rsct.
    string_to_sign = "\n".join(
        [permissions, "", se, resource, "", "", "", SAS_VERSION, "b", "", "", "", "", "", "", ""]
    )
    sig = _hmac_b64(account_key, string_to_sign)
    params = {"sv": SAS_VERSION, "sr": "b", "sp": permissions, "se": se, "sig": sig}
    return urlencode(params, quote_via=quote)


def account_sas(
    *,
    account_name: str,
    account_key: str,
    permissions: str,
    resource_types: str,
    expiry: float,
) -> str:
    """Return a blob-service account SAS query string (used to create the container)."""
    se = _azure_time(expiry)
    # Order per "Create an account SAS", version 2020-12-06 and later; note the final newline.
    string_to_sign = "\n".join(
        [account_name, permissions, "b", resource_types, "", se, "", "", SAS_VERSION, "", ""]
    )
    sig = _hmac_b64(account_key, string_to_sign)
    params = {
        "sv": SAS_VERSION,
        "ss": "b",
        "srt": resource_types,
        "sp": permissions,
        "se": se,
        "sig": sig,
    }
    return urlencode(params, quote_via=quote)
