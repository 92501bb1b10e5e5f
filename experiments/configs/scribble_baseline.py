"""Scribble-only baseline (issue 12, item 3; the comparison of Vernaza & Chandraker's RAWKS paper):
the baseline network trained with cross-entropy on the generated scribble pixels only
(``data.train_labels = "scribbles"``; about 3 % of the pixels, the same scribbles as
``rawks.py``'s, unlabelled pixels ignored). Evaluated on dense labels like every method;
RAWKS must beat it to show what its random-walk propagation adds. Compare with a
``rawks.py`` run of the same data, model, crop, steps and seed."""

from rwseg.configs import common


def get_config(arg=None):
    c = common.get_config("baseline")
    c.data.scribbles = True           # batches carry "scribbles" (rwseg.data.scribbles_from_labels)
    c.data.train_labels = "scribbles"
    return common.finalize(c, arg)
