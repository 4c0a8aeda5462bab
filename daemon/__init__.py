"""inboxd: get every file dropped into an inbox folder into a Marple DB stream, exactly once."""

from __future__ import annotations

__version__ = "0.1.0"
