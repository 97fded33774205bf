"""``python -m diffsynth_cog.cli`` (and ``torchrun -m diffsynth_cog.cli``)."""

import sys

from diffsynth_cog.cli import main

sys.exit(main())
