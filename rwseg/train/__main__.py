"""``python -m rwseg.train`` = ``rwseg train``: ``--config NAME|PATH[:smoke] --workdir DIR [--config.key=value ...]``.

``--config`` takes a shipped config's name (``spn``, ``spn:smoke``; :mod:`rwseg.configs`)
or a config file's path; ``:smoke`` selects the few-second configuration. Multi-host:
``--coordinator_address host:port --num_processes N --process_id i`` (or the
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment
variables) call ``jax.distributed.initialize`` before anything else.

The config is validated before anything is built (:mod:`rwseg.train.config_check`):
an invalid value, a workdir that is a file, a changed config on resume (see
``config.allow_config_change``) or a workdir whose checkpoints are all damaged end the
run with exit status 1 and one message naming the ``config.`` key / path. The flags are
defined in :mod:`rwseg.cli`.
"""

import sys

from rwseg.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("train", prog="python -m rwseg.train"))
