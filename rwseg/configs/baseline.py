"""Baseline: the backbone alone, 1/8 logits bilinearly upsampled (softmax loss)."""

from rwseg.configs import common


def get_config(arg=None):
    return common.finalize(common.get_config("baseline"), arg)
