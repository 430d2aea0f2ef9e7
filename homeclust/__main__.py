"""``python -m homeclust`` runs the command line."""

from homeclust.cli import main

main()
