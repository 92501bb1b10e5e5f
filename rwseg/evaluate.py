"""``python -m rwseg.evaluate --workdir DIR``: evaluate a saved run (see :mod:`rwseg.train.evaluate`)."""

import sys

from rwseg.train.evaluate import evaluate_run, main

__all__ = ["evaluate_run", "main"]

if __name__ == "__main__":
    sys.exit(main())
