"""``python -m rwseg COMMAND`` = the ``rwseg`` console script (:mod:`rwseg.cli`)."""

import sys

from rwseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
