"""GPU benchmark (run on GPU machines): ``python -m xdit_multigpu.bench --help``."""
import sys

from .cli import main

sys.exit(main())
