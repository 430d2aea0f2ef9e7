"""Entry point for the lab's own background processes (started by the lab, not by users)::

    python -m homeclust.lab supervise SPEC.json     # keeps one node running
    python -m homeclust.lab whoami ADDRESS PORT     # the internet host's address service
"""

from __future__ import annotations

import sys

from homeclust.lab import supervisor, whoami


def main(argv: list[str]) -> int:
    if argv[:1] == ["supervise"]:
        return supervisor.main(argv[1:])
    if argv[:1] == ["whoami"]:
        return whoami.main(argv[1:])
    print("usage: python -m homeclust.lab {supervise SPEC.json | whoami ADDRESS PORT}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
