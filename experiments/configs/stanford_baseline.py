"""Stanford Background baseline (issue 12): larger crops and a wider ASPP than the default.

Chosen on the validation split (experiments/stanford_baseline_log.md, run r02): crop
224 (the photos are about 320x240; crop 128 sees too little context) and ASPP rates
(1, 3, 6, 12) at 1/8 resolution (receptive field about 2x larger than (1, 2, 3)).
Seeds 0 and 1: 54.2 / 56.8 mIoU, 77.1 / 78.6 % pixel accuracy on the whole validation
split (every image at its own size), against 47.3 / 71.9 for the default baseline config
at crop 128 (seed 0).
About 3x the per-step cost of crop 128 (roughly 10 min on 2 idle cores; 31 min measured
on a machine shared with other jobs).

The data folder comes from ``$RWSEG_STANFORD_DIR`` or ``--config.data.manual_dir=...``.
Evaluation covers the whole validation split (``eval_batches = 0``), the benchmark setting.
"""

from rwseg.configs import common


def get_config(arg=None):
    c = common.get_config("baseline")
    c.data.name = "stanford_background"
    c.data.crop_size = 224
    c.model.aspp_rates = (1, 3, 6, 12)
    c.num_steps = 2200
    c.checkpoint_every = 550
    c.eval_batches = 0
    return common.finalize(c, arg)
