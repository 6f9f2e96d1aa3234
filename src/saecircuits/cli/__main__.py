"""``python -m saecircuits.cli ...``: the ``saecircuits`` command (its console entry point) without the script."""

from saecircuits.cli import main

main()
