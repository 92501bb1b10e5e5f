"""Model construction and the pure train step.

The train state is a plain pytree ``{"params", "opt_state"[, "stats"]}`` of arrays
(``nnx.split`` of the model into its graph definition, its ``nnx.Param`` leaves and
its constant :class:`rwseg.layers.statistic.Statistic` leaves, as pure dicts). The step
merges the model inside the traced function (``nnx.merge``), so it is a pure
``(state, batch, step) -> (state, metrics)`` function that ``jax.jit`` compiles once
for a mesh; optax updates the params directly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rwseg import data
from rwseg.models import build_model, dataset_statistics, model_class
from rwseg.layers.device_local import batch_axis
from rwseg.layers.statistic import Statistic
from rwseg.layers.memory import remat_scope
from rwseg.train import parallel
from rwseg.train.init_from import SUBTREE, freeze_subtrees, scale_method_updates
from rwseg.train.optim import make_optimizer

__all__ = ["Setup", "create", "source_kwargs", "augmentation_kwargs", "training_batches", "compute_statistics",
           "make_train_step", "split_microbatches", "merge", "load_pretrained"]


def source_kwargs(config) -> dict:
    """data_dir / manual_dir for ``rwseg.data.load_source`` ("" = default).

    Args:
      config: a training config.

    Returns:
      The keyword arguments of :func:`rwseg.data.load_source` (the built-in dataset's
      ``num_train``, ``num_validation``, ``image_size`` too).
    """
    kw = {}
    if config.data.data_dir:
        kw["data_dir"] = config.data.data_dir
    if config.data.manual_dir:
        kw["manual_dir"] = config.data.manual_dir
    if config.data.name == "synthetic":
        syn = config.data.synthetic
        kw.update(num_train=int(syn.num_train), num_validation=int(syn.num_validation),
                  image_size=(int(syn.image_size), int(syn.image_size)))
    return kw


def augmentation_kwargs(config) -> dict:
    """Training augmentation of :func:`rwseg.data.make_batches` from ``config.data``.

    Args:
      config: a training config.

    Returns:
      ``{"scale_range": (lo, hi), "flip": bool, "color_jitter": (brightness, contrast,
      saturation)}`` (``(1, 1)`` = no scaling).
    """
    d = config.data
    return {"scale_range": tuple(float(v) for v in d.scale_range), "flip": bool(d.flip),
            "color_jitter": tuple(float(v) for v in d.color_jitter)}


def training_batches(config, source, mesh, *, start_step: int = 0, num_steps: int):
    """This process's training batches as the trainer draws them (:func:`rwseg.data.make_batches`).

    Batch ``s`` is a pure function of ``(config.seed, s)``: crops of ``config.data.crop_size``,
    the augmentation of :func:`augmentation_kwargs`, the scribbles when ``config.data.scribbles``,
    and this process's shard of the global ``config.batch_size`` over ``mesh``.

    Args:
      config: a training config.
      source: the training split (:func:`rwseg.data.load_source`).
      mesh: the device mesh (its size must divide ``config.batch_size``).
      start_step: the first batch's step (a resumed run starts at its checkpoint's step).
      num_steps: how many batches (``>= 0``).

    Returns:
      An iterator of per-process numpy batch dicts (``"image"`` (b, S, S, 3), ``"label"``
      (b, S, S) and, with scribbles, ``"scribbles"`` (b, S, S)).
    """
    return data.make_batches(source, batch_size=parallel.local_batch_size(int(config.batch_size), mesh),
                             crop_size=int(config.data.crop_size), train=True, seed=int(config.seed),
                             start_step=int(start_step), num_steps=max(int(num_steps), 0),
                             scribbles=bool(config.data.scribbles), shard_index=jax.process_index(),
                             shard_count=jax.process_count(), **augmentation_kwargs(config))


def compute_statistics(config, source) -> dict:
    """Dataset constants the method needs (``{}`` for most), from a few training batches.

    Args:
      config: a training config (``config.statistics_batches`` batches, seed ``config.seed + 1``).
      source: the training split.

    Returns:
      :func:`rwseg.models.dataset_statistics` of their labels.
    """
    if getattr(model_class(config.method), "dataset_statistics", None) is None:
        return {}
    batches = data.make_batches(source, batch_size=config.batch_size, crop_size=config.data.crop_size,
                                train=True, seed=config.seed + 1, num_steps=int(config.statistics_batches),
                                **augmentation_kwargs(config))
    labels = np.concatenate([b["label"] for b in batches], axis=0)
    return dataset_statistics(config, labels)


@dataclasses.dataclass
class Setup:
    """Everything derived from a config: graph definition, initial state, optimiser."""

    graphdef: object
    state: dict
    tx: optax.GradientTransformation
    schedule: object
    num_classes: int
    remat: bool = False  # config.remat: rematerialise blocks and unrolled refinements (rwseg.layers.memory)
    microbatches: int = 1  # config.microbatches: gradient accumulation over this many slices of the batch


def create(config, num_classes: int, statistics: dict, *, pretrained: bool = True,
           abstract: bool = False) -> Setup:
    """Build the model (seed ``config.seed``) and the initial train state.

    With ``pretrained`` (the default) a ``config.model.pretrained`` checkpoint is loaded into the
    ResNet encoder (:func:`load_pretrained`); ``False`` skips it (a checkpoint will be restored).

    Initialisation runs under ``jax.jit`` (one compilation instead of hundreds of eager
    dispatches) with an ``rbg`` PRNG key; the graph definition comes from
    ``nnx.eval_shape`` (no arrays). The same config gives the same parameters on every
    process and device count (the init is not sharded).

    ``abstract=True``: ``Setup.state`` holds ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``
    of the initialisation; nothing is allocated or computed), for ahead-of-time compilation
    (:mod:`rwseg.train.plan`).

    Args:
      config: a training config.
      num_classes: K.
      statistics: :func:`compute_statistics`.
      pretrained: load ``config.model.pretrained`` (ignored with ``abstract``).
      abstract: shapes only (``jax.ShapeDtypeStruct`` leaves).

    Returns:
      The :class:`Setup`: graph definition, initial state ``{"params", "opt_state"[, "stats"]}``
      (frozen parts and the method's learning-rate multiplier applied to the optimiser),
      optimiser, schedule, K.
    """

    def build():
        # rbg keys: XLA compiles RngBitGenerator far faster than unrolled threefry on CPU
        # (minutes -> seconds for a model's worth of initialisers on a loaded 2-core box).
        key = jax.random.key(int(config.seed), impl="rbg")
        return build_model(config, num_classes, rngs=nnx.Rngs(key), statistics=statistics)

    graphdef = nnx.split(nnx.eval_shape(build), nnx.Param, Statistic)[0]
    tx, schedule = make_optimizer(config.optimizer, int(config.num_steps))
    # rwseg.train.init_from: zero updates for params["backbone"] and/or the method's own layers
    frozen_backbone, frozen_method = bool(config.freeze_backbone), bool(config.freeze_method)
    if frozen_backbone or frozen_method:
        tx = freeze_subtrees(tx, lambda name: frozen_backbone if name == SUBTREE else frozen_method)
    if float(config.optimizer.method_lr_mult) != 1.0:  # a larger rate for the method's new layers
        tx = scale_method_updates(tx, config.optimizer.method_lr_mult)

    @jax.jit
    def init():
        _, params, stats = nnx.split(build(), nnx.Param, Statistic)
        params = nnx.to_pure_dict(params)
        return params, tx.init(params), nnx.to_pure_dict(stats)

    params, opt_state, stats = jax.eval_shape(init) if abstract else init()
    if pretrained and not abstract and config.model.pretrained:  # a torchvision/timm ResNet checkpoint into the encoder
        params, stats = load_pretrained(graphdef, params, stats, config.model.pretrained)
        opt_state = jax.jit(tx.init)(params)
    state = {"params": params, "opt_state": opt_state}
    if jax.tree.leaves(stats):
        state["stats"] = stats
    return Setup(graphdef, state, tx, schedule, num_classes, remat=bool(config.remat),
                 microbatches=int(config.microbatches))


def load_pretrained(graphdef, params: dict, stats: dict, path: str) -> tuple[dict, dict]:
    """The state with the ResNet encoder's arrays from a torchvision / timm checkpoint.

    Loads with :func:`rwseg.models.backbones.load_torch_weights` and prints its report.

    Args:
      graphdef: the model's graph definition (of :func:`create`).
      params: the pure ``nnx.Param`` dict.
      stats: the pure ``Statistic`` dict (the frozen BatchNorm affines among them).
      path: a ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` checkpoint.

    Returns:
      ``(params, stats)``: new pure dicts, the encoder's entries replaced.
    """
    from rwseg.models.backbones import load_torch_weights

    model = nnx.merge(graphdef, params, stats)
    report = load_torch_weights(model, path)
    print(f"rwseg.train: config.model.pretrained: {report.summary()}", flush=True)
    _, params, stats = nnx.split(model, nnx.Param, Statistic)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def merge(graphdef, state):
    """The NNX model of a train state (inside or outside ``jit``).

    Args:
      graphdef: the model's graph definition.
      state: a train state (``params`` and, for a model with statistics, ``stats``).

    Returns:
      The model (``nnx.Module``).
    """
    if "stats" in state:
        return nnx.merge(graphdef, state["params"], state["stats"])
    return nnx.merge(graphdef, state["params"])


def split_microbatches(batch: dict, microbatches: int, mesh) -> dict:
    """Batch arrays (B, ...) -> (microbatches, B / microbatches, ...), each slice spread over ``mesh``.

    Slice ``k`` holds the examples ``k, k + m, k + 2m, ...`` (m = ``microbatches``): with
    the batch sharded contiguously along ``"data"`` and each device's share divisible by
    m, every slice takes ``share / m`` examples from every device, so no data moves.

    Args:
      batch: ``{name: (B, ...) array}``, sharded along ``"data"``.
      microbatches: m, dividing every device's share of B.
      mesh: the training mesh.

    Returns:
      ``{name: (m, B / m, ...) array}``.
    """
    m = int(microbatches)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))

    def split(x):
        x = x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(split, batch)


def make_train_step(setup: Setup, mesh):
    """A jit-compiled ``(state, batch, step) -> (state, metrics)`` over ``mesh``.

    batch arrays are sharded along ``"data"``, the state is replicated; the loss is the
    mean over the global batch, so the result does not depend on the device count.
    The model is traced under :func:`rwseg.layers.device_local.batch_axis`: its
    per-example solvers run device-local (``jax.shard_map``), so no solver loop waits on
    the other devices; ``jax.jit`` inserts the gradient all-reduce outside them.

    ``setup.remat``: the loss is traced under :func:`rwseg.layers.memory.remat_scope`.
    ``setup.microbatches = m > 1``: gradient accumulation. The batch is cut into m slices
    (:func:`split_microbatches`); a ``lax.scan`` sums each slice's loss, metrics and
    gradient in float32 and divides by m, then one optimiser update follows. The
    activations of one slice are live at a time. This equals the step on the whole batch
    (to float rounding) when every slice's loss is the mean over an equal share, which
    holds for the batch-mean losses of the methods whenever each slice has as many
    labelled pixels (dense labels without ignored pixels); with unequal counts it is the
    mean of the slices' means. Each device's share of the batch must divide by m. The
    gradient all-reduce then runs once per slice (inside the scan): the price of the
    smaller memory.

    Args:
      setup: the :class:`Setup` of :func:`create`.
      mesh: the device mesh.

    Returns:
      The jitted step; ``metrics`` holds the loss, its terms, ``grad_norm`` and ``learning_rate``.
    """
    graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule
    micro = int(setup.microbatches)
    if micro < 1:
        raise ValueError(f"config.microbatches: expected an int >= 1, got {micro}")

    def grads_of(params, state, batch, step):
        def loss_fn(params):
            model = merge(graphdef, dict(state, params=params))
            with batch_axis(mesh), remat_scope(setup.remat):
                return model.loss(batch, step)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def accumulated(state, batch, step):
        size = jax.tree.leaves(batch)[0].shape[0]
        if size % (mesh.devices.size * micro):
            raise ValueError(f"config.microbatches: expected a divisor of the per-device batch "
                             f"{size // mesh.devices.size} (batch {size} over {mesh.devices.size} devices), got {micro}")
        params = state["params"]

        def body(total, mb):
            out = grads_of(params, state, mb, step)
            return jax.tree.map(lambda t, v: t + v.astype(t.dtype), total, out), None

        split = split_microbatches(batch, micro, mesh)
        shapes = jax.eval_shape(lambda: grads_of(params, state, jax.tree.map(lambda x: x[0], split), step))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes)
        total, _ = jax.lax.scan(body, zeros, split)
        return jax.tree.map(lambda t, s: (t / micro).astype(s.dtype), total, shapes)

    def step_fn(state, batch, step):
        if micro == 1:
            (loss, aux), grads = grads_of(state["params"], state, batch, step)
        else:
            (loss, aux), grads = accumulated(state, batch, step)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(step))
        return dict(state, params=params, opt_state=opt_state), metrics

    rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(step_fn, in_shardings=(rep, shard, rep), out_shardings=(rep, rep), donate_argnums=0)
