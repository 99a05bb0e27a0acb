"""``python -m excitation_dist.cli``: what torchrun and the deepspeed launcher run on each rank."""

import sys

from excitation_dist.cli import main

sys.exit(main())
