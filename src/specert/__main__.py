"""``python -m specert``: the command line (:mod:`specert.cli`)."""

from specert.cli import main

main()
