"""``python -m saecircuits.results --write-schema``: regenerate the JSON Schema and docs/results.md."""

import sys

from saecircuits.results.reference import main

sys.exit(main())
