"""``rwseg evaluate --workdir DIR`` (or ``python -m rwseg.evaluate``): evaluate a saved run
(see :mod:`rwseg.train.evaluate`; the flags are in :mod:`rwseg.cli`)."""

import sys

from rwseg.train.evaluate import evaluate_run

__all__ = ["evaluate_run"]

if __name__ == "__main__":
    from rwseg.cli import run_command

    sys.exit(run_command("evaluate", prog="python -m rwseg.evaluate"))
