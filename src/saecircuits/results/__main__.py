"""``python -m saecircuits.results --write-schema``: regenerate the JSON Schema and docs/results.md; ``--check``:
exit 1 when either is stale; ``--check runs/demo/results.json``: validate a run's file against the schema."""

import sys

from saecircuits.results.reference import main

sys.exit(main())
