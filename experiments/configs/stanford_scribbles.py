"""RAWKS against the scribble-only baseline on Stanford Background (issue 12, item 3):
``stanford_scribbles.py:METHOD[,smoke]`` with METHOD ``rawks`` or ``scribble_baseline``.

Both runs learn from the same generated scribbles (``rwseg.data.scribbles_from_labels``,
about 3 % of the pixels) with the data and segmentation network of
``stanford_baseline.py`` (crop 224, ASPP (1, 3, 6, 12)), the same steps, schedule and
seed: the only difference is RAWKS's random-walk label propagation and its
uncertainty-weighted loss (Vernaza & Chandraker, eq. 11) against plain cross-entropy on
the scribble pixels. 1100 steps (half the dense baseline's 2200: RAWKS costs several times
a baseline step on a CPU). Evaluation: Q (the network) on the whole validation split;
for RAWKS also P (the propagated labels) on the training images and its abstention rate.

The table (Q of both, the paired bootstrap interval of the difference, P and the abstention)::

    python experiments/refine_benchmark.py --config experiments/configs/stanford_scribbles.py \
        --control scribble_baseline --methods rawks --steps 1100 --seeds 0 --out OUT

``,smoke``: the few-second synthetic configs (tests).
"""

import pathlib

from rwseg import configs
from rwseg.train.config_files import load_config_file, parse_method_variant

STANFORD_BASELINE = pathlib.Path(__file__).resolve().with_name("stanford_baseline.py")
SCRIBBLE_BASELINE = pathlib.Path(__file__).resolve().with_name("scribble_baseline.py")
METHODS = ("rawks", "scribble_baseline")

# Item-3 variants tried on the validation split, by name (``--methods rawks_alpha0`` of
# refine_benchmark.py): (method, overrides). ``rawks_alpha0`` removes the uncertainty
# weighting of eq. 11 (w = exp(-temperature H(P)) = 1): tests whether down-weighting the uncertain
# boundary pixels is what makes Q's predictions blobby (stanford_refine_log.md, RAWKS).
# ``rawks_full`` propagates at full resolution (``rawks.layer.downsample = 1``): tests whether the
# half-resolution targets are what blurs Q's boundaries.
# ``rawks_then_q`` is the paper's "train P, Q, then Q" (Table 2): started from a finished
# ``rawks`` run (every parameter, ``--base rawks_then_q=RUN`` of refine_benchmark.py), Q is
# fine-tuned on the propagated labels with the boundary network fixed.
# ``rawks_then_q_unweighted`` is that stage with the loss unweighted (``rawks.layer.temperature = 0``:
# w = 1, so Q fits every pixel of P, boundaries included). With the boundary network fixed
# the weight no longer shapes P, so this isolates what eq. 11's down-weighting of the
# uncertain (boundary) pixels costs Q. Its abstention is 0 by definition (w = 1 < 0.5
# nowhere); P is the same as ``rawks_then_q``'s. ``rawks_then_q_hard`` (not the paper's loss)
# fits Q to argmax P by cross-entropy where P does not abstain (``rawks.targets = "hard"``):
# tests whether fitting P's soft boundary distributions is what keeps Q from P's boundaries.
# ``dense_labels`` is the oracle for all of the above: the scribble-only network's config
# trained on the dense ground truth instead (``data.train_labels = "dense"``; the paper's
# "train on dense ground truth" row, Table 2), i.e. Q trained on a perfect P. From scratch it
# bounds what any propagated targets can add at this budget; as a second stage (``--base
# dense_labels=SCRIBBLE_RUN``) it bounds ``rawks_then_q``.
VARIANTS = {
    "rawks_alpha0": ("rawks", {"rawks.layer.temperature": 0.0}),
    "rawks_full": ("rawks", {"rawks.layer.downsample": 1}),
    "rawks_then_q": ("rawks", {"init_params": "all", "freeze_method": True}),
    "rawks_then_q_unweighted": ("rawks", {"init_params": "all", "freeze_method": True, "rawks.layer.temperature": 0.0}),
    "rawks_then_q_hard": ("rawks", {"init_params": "all", "freeze_method": True, "rawks.targets": "hard"}),
    "dense_labels": ("scribble_baseline", {"data.train_labels": "dense"}),
}


def get_config(arg=None):
    method, overrides, smoke = parse_method_variant(arg, METHODS, VARIANTS)
    variant = "smoke" if smoke else None
    c = configs.get_config("rawks", variant) if method == "rawks" else load_config_file(str(SCRIBBLE_BASELINE), variant)
    if smoke:  # the few-second synthetic data and model of common.apply_smoke (tests)
        c.update_from_flattened_dict(overrides)
        return c
    base = load_config_file(str(STANFORD_BASELINE))
    scribble_keys = {k: c.data[k] for k in ("scribbles", "train_labels") if k in c.data}
    c.data = base.data
    c.data.update(scribble_keys)
    c.model = base.model
    c.num_steps = 1100
    c.checkpoint_every = 550
    c.eval_batches = 0
    c.progress = False
    c.update_from_flattened_dict(overrides)  # last, so a variant may override any of the above
    return c
