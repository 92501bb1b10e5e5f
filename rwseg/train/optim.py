"""Optimiser and learning-rate schedule from ``config.optimizer``.

Schedule: linear warmup to ``learning_rate`` over ``warmup_steps``, then (``schedule``)
cosine decay to ``learning_rate * end_factor`` at ``num_steps``
(optax.warmup_cosine_decay_schedule), or DeepLab's "poly" decay
``end + (learning_rate - end) (1 - t / T)^power`` over the ``T = num_steps - warmup_steps``
steps after the warmup (optax.polynomial_schedule; DeepLab: ``power = 0.9``, ``end_factor = 0``).
Optimisers: ``adamw`` (``weight_decay``) or ``sgd`` (Nesterov-free ``momentum``, decoupled
weight decay); optional global-norm gradient clipping; with ``max_nonfinite_skips > 0`` an
update whose gradient is not finite is skipped (``optax.apply_if_finite``; the step's
``grad_norm`` in metrics.jsonl is then NaN/inf), and after that many consecutive bad
steps the NaN goes through (the run then stops with a FloatingPointError).
"""

from __future__ import annotations

import optax

__all__ = ["make_schedule", "make_optimizer"]


def make_schedule(opt_config, num_steps: int):
    """Linear warmup to ``learning_rate``, then cosine or poly decay to ``learning_rate * end_factor``.

    Args:
      opt_config: ``config.optimizer`` (``learning_rate``, ``warmup_steps``, ``end_factor``,
        ``schedule``, ``power``).
      num_steps: the run's steps (the decay ends there).

    Returns:
      An optax schedule, step -> learning rate.
    """
    lr = float(opt_config.learning_rate)
    warmup = max(0, min(int(opt_config.warmup_steps), num_steps - 1))
    kind = opt_config.schedule
    if kind == "poly":
        end = lr * float(opt_config.end_factor)
        decay = optax.polynomial_schedule(init_value=lr, end_value=end, power=float(opt_config.power),
                                          transition_steps=max(num_steps - warmup, 1))
        if not warmup:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
    if kind != "cosine":
        raise ValueError(f"config.optimizer.schedule: expected 'cosine' or 'poly', got {kind!r}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=lr * float(opt_config.end_factor))


def make_optimizer(opt_config, num_steps: int):
    """The optimiser of ``config.optimizer``: AdamW or SGD with momentum (decoupled weight
    decay), gradient clipping (``grad_clip_norm > 0``) and skipping of non-finite updates
    (``max_nonfinite_skips > 0``).

    Args:
      opt_config: ``config.optimizer``.
      num_steps: the run's steps.

    Returns:
      ``(optax.GradientTransformation, schedule)``.
    """
    schedule = make_schedule(opt_config, num_steps)
    name = opt_config.name
    if name == "adamw":
        tx = optax.adamw(schedule, weight_decay=float(opt_config.weight_decay))
    elif name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(float(opt_config.weight_decay)),
                         optax.sgd(schedule, momentum=float(opt_config.momentum)))
    else:
        raise ValueError(f"config.optimizer.name: expected 'adamw' or 'sgd', got {name!r}")
    if float(opt_config.grad_clip_norm) > 0:
        tx = optax.chain(optax.clip_by_global_norm(float(opt_config.grad_clip_norm)), tx)
    skip = int(opt_config.max_nonfinite_skips)
    if skip > 0:  # drop updates whose gradient has a NaN/inf (at most `skip` in a row)
        tx = optax.apply_if_finite(tx, max_consecutive_errors=skip)
    return tx, schedule
