"""Baseline: the backbone alone, 1/8 logits bilinearly upsampled (softmax loss)."""

from rwseg.train.config_files import sibling

common = sibling(__file__, "common")


def get_config(arg=None):
    return common.finalize(common.get_config("baseline"), arg)
