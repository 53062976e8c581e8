"""`python -m distfinalize` (also under torchrun / srun)."""

from distfinalize.cli import console_main

console_main()
