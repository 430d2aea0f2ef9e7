"""homeclust: turn a few old computers into a working HPC cluster over SSH.

The package is organised along the data flow described in DESIGN.md:
inventory -> connections -> facts -> steps plan changes -> runner applies them.
"""

__version__ = "0.1.0"

#: Workers handled at once (``--forks``).  Every worker rides on the one master
#: connection, so this bounds the admin process's own work, not SSH sessions; chosen
#: from scripts/bench on 1 master + 32 workers, no-op `up`: 4 forks 2.7 s, 8: 2.1 s,
#: 16: 1.85 s, 32: 1.9 s.
DEFAULT_FORKS = 16
