"""``python -m shardpreempt`` runs the console script."""

from .cli import main

main()
