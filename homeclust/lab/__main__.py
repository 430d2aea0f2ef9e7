"""Entry point for the lab's own background processes (started by the lab, not by users)::

    python -m homeclust.lab supervise SPEC.json     # keeps one node running
    python -m homeclust.lab whoami ADDRESS PORT     # the internet host's address service
    python -m homeclust.lab aptcache --socket PATH --cache DIR --stats FILE   # archive relay
"""

from __future__ import annotations

import sys

from homeclust.lab import aptcache, supervisor, whoami


def main(argv: list[str]) -> int:
    if argv[:1] == ["supervise"]:
        return supervisor.main(argv[1:])
    if argv[:1] == ["whoami"]:
        return whoami.main(argv[1:])
    if argv[:1] == ["aptcache"]:
        return aptcache.main(argv[1:])
    print("usage: python -m homeclust.lab {supervise SPEC.json | whoami ADDRESS PORT | "
          "aptcache --socket PATH --cache DIR --stats FILE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
