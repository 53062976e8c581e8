"""`python -m distfinalize` (also under torchrun / srun)."""

from distfinalize.startup import imports_starting

imports_starting()  # before torch imports (startup.py says why)

from distfinalize.cli import console_main  # noqa: E402

console_main()
