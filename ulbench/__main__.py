"""``python -m ulbench`` (and ``torchrun ... -m ulbench``): the same command line as ``ulbench``."""
import sys

from ulbench.cli import main

sys.exit(main())
