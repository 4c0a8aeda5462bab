"""The optional parts of inboxd (``pyproject.toml``'s extras) and what says one is missing.

A field PC installs only what the daemon runs. The sandbox server (``inboxd sandbox``,
``inboxd demo``) and the data service's OAuth signing are extras; their modules import them,
and are imported only by the commands that need them. Those commands call :func:`require`
first, so a missing extra is one line naming the extra to install, not an ImportError.
"""

from __future__ import annotations

import importlib.util

from daemon.errors import MissingExtraError

#: extra name -> the top-level modules it brings (its direct dependencies in pyproject.toml)
EXTRAS: dict[str, tuple[str, ...]] = {
    "sandbox": ("starlette", "uvicorn"),
    "data-service": ("authlib",),
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (none: the extra is installed).

    Only looks them up (no import), so a command that has them pays nothing for asking."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require(extra: str, needed_by: str) -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` when it is not installed.

    ``needed_by`` says what needs it, as a person wrote it (``inboxd sandbox``,
    ``[api] kind = "data-service"``)."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(
            f"{needed_by} needs inboxd's optional {extra!r} part, which is not installed "
            f"(no {', '.join(absent)})",
            advice=f"install it into inboxd's venv: `pip install --require-hashes -r "
            f"requirements-{extra}.lock` from a checkout, or an offline bundle built with "
            f"`--extras {extra}` (README 'Install on a logging PC')",
        )


def require_for_kind(kind: str) -> None:
    """What ``[api] kind`` needs beyond the core install: checked before ``run``, ``check``
    and ``push`` start, so nothing is half started."""
    if kind == "data-service":
        require("data-service", '[api] kind = "data-service"')
