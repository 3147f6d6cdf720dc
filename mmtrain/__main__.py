"""`python -m mmtrain ...` (what torchrun launches) is the same as the `mmtrain` command."""

import sys

from mmtrain.cli import main

sys.exit(main())
