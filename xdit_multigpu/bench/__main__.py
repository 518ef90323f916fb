import sys

from .flux_first import main

sys.exit(main())
