"""`python -m orchestrator ...` = `ddm ...`, for clusters where the package is not installed."""
import sys

from orchestrator.cli import main

sys.exit(main())
