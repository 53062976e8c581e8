"""`python -m distfinalize` (also under torchrun / srun)."""

import sys

from distfinalize.cli import main

sys.exit(main())
