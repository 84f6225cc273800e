"""`python -m skcdf ...` (also what `torchrun -m skcdf train ...` runs)."""

import sys

from skcdf.cli import main

sys.exit(main())
