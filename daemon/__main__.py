"""``python -m daemon`` and the ``inboxd`` console script.

Kept light on purpose: ``inboxd run`` starts listening for SIGTERM before the heavy imports,
so a service stopped while it is still starting exits cleanly instead of being killed.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run the command line."""
    if sys.argv[1:2] == ["run"]:
        from daemon.service.signals import catch_early_signals

        catch_early_signals()
    from daemon.commands.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
