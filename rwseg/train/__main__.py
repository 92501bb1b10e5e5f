"""CLI: ``python -m rwseg.train --config experiments/configs/<method>.py --workdir DIR [--config.key=value ...]``.

``--config path:smoke`` selects the few-second configuration. Multi-host:
``--coordinator_address host:port --num_processes N --process_id i`` (or the
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment
variables) call ``jax.distributed.initialize`` before anything else.

The config is validated before anything is built (:mod:`rwseg.train.config_check`):
an invalid value, a workdir that is a file, a changed config on resume (see
``config.allow_config_change``) or a workdir whose checkpoints are all damaged end the
run with exit status 1 and one message naming the ``config.`` key / path.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (experiments/configs/<method>.py[:smoke]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, panels); resumes if it has checkpoints.")
flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
                    "host:port of process 0 for multi-host runs.")
flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")), "Number of processes.")
flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")), "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS["verbosity"].using_default_value:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    from rwseg.train.parallel import initialize

    initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from rwseg.train.checkpoint import CheckpointMismatchError, NoIntactCheckpointError
    from rwseg.train.config_check import ConfigError, check_config
    from rwseg.train.trainer import train_and_evaluate

    try:  # user errors: one clear message, no traceback, exit status 1
        check_config(FLAGS.config, workdir=FLAGS.workdir)
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ConfigError, NoIntactCheckpointError, CheckpointMismatchError) as e:
        sys.exit(f"rwseg.train: error: {e}")
    if result:
        from rwseg.train.evaluate import markdown_table

        print(markdown_table([(FLAGS.config.method, result)], FLAGS.config.trimap_widths))
        print(f"results and panels: {os.path.join(FLAGS.workdir, 'eval')}")


if __name__ == "__main__":
    app.run(main)
