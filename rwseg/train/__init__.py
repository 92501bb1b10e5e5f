"""Training and evaluation: ``rwseg train --config <method>[:smoke] --workdir DIR`` (:mod:`rwseg.cli`).

Modules: :mod:`~rwseg.train.trainer` (the loop), :mod:`~rwseg.train.state` (model,
train state, pure jitted step), :mod:`~rwseg.train.parallel` (mesh, sharding,
multi-host), :mod:`~rwseg.train.optim`, :mod:`~rwseg.train.checkpoint` (orbax),
:mod:`~rwseg.train.evaluate` (metric counts, metrics table, panels), :mod:`~rwseg.train.panels`,
:mod:`~rwseg.train.workdir` (a run directory's config history and metrics log),
:mod:`~rwseg.train.config_check` (validation) and :mod:`~rwseg.train.config_upgrade` (an
older run's config in the current keys).
"""

from rwseg.train.config_files import load_config_file
from rwseg.train.trainer import train_and_evaluate

__all__ = ["train_and_evaluate", "load_config_file"]
