"""`python -m sae_lens_kl ...`: the `sae-lens-kl` command."""

import sys

from sae_lens_kl.cli import main

sys.exit(main())
