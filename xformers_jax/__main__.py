"""`python -m xformers_jax ...`: the same as the `xformers-jax` console script."""

import sys

from xformers_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
