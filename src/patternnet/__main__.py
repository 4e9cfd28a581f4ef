"""``python -m patternnet`` (and ``torchrun -m patternnet fit ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
