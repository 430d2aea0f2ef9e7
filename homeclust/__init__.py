"""homeclust: turn a few old computers into a working HPC cluster over SSH.

The package is organised along the data flow described in DESIGN.md:
inventory -> connections -> facts -> steps plan changes -> runner applies them.
"""

__version__ = "0.1.0"
