"""Settings shared by every method's config (imported by the per-method files).

``get_config(method)`` returns the full default ConfigDict; a per-method file adds its
own section (``config.rwn``, ``config.spn``, ...). ``apply_smoke(config)`` shrinks a
config to a few-second run (tests, ``--config path:smoke``).
"""

import ml_collections


def get_config(method: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic"        # rwseg.data.dataset_info names
    c.data.data_dir = ""             # "" = the data layer's default
    c.data.manual_dir = ""           # Stanford Background folder (iccv09Data layout)
    c.data.crop_size = 64            # training crops (multiple of 8)
    c.data.synthetic = ml_collections.ConfigDict()  # builder kwargs of the built-in dataset
    c.data.synthetic.num_train = 256
    c.data.synthetic.num_validation = 64
    c.data.synthetic.image_size = 64
    c.data.scale_range = (0.75, 1.25)  # training: random scale factor range ((1, 1) = none)
    c.data.flip = True               # training: random left-right flips
    c.data.color_jitter = (0.0, 0.0, 0.0)  # training: (brightness, contrast, saturation) strengths
    c.data.scribbles = False         # RAWKS trains from generated scribbles
    c.data.train_labels = "dense"    # "scribbles": train on the scribbles only (scribble_baseline.py)
    c.data.train_split = "train"
    c.data.eval_split = "validation"

    c.batch_size = 8                 # global batch (divided over processes and devices)
    c.num_steps = 300
    # memory levers for large crops and pods (rwseg.layers.memory, rwseg.train.state; `rwseg plan` shows their effect)
    c.compute_dtype = "float32"      # "bfloat16": conv blocks compute in bfloat16 (params, solvers, losses stay float32)
    c.remat = False                  # True: rematerialise conv blocks and unrolled refinement steps in the backward pass
    c.microbatches = 1               # >1: accumulate gradients over this many slices of each device's batch

    c.model = ml_collections.ConfigDict()
    c.model.width = 16               # stem channels; encoder stages use width * (1, 2, 4)
    c.model.depth = 1                # extra 3x3 convs per encoder stage
    c.model.aspp_rates = (1, 2, 3)   # dilated 3x3 convs at 1/8 resolution
    c.model.features = 48            # decoder feature channels
    c.model.norm = "group"           # "group" | "none" (no BatchNorm: pure data-parallel step)
    c.model.backbone = "compact"     # "compact" (the keys above) | "resnet50" | "resnet101" (config.model.resnet)
    c.model.pretrained = ""          # a torchvision/timm ResNet .pth / .safetensors loaded at the start

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"       # "adamw" | "sgd" (momentum)
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.schedule = "cosine"  # "cosine" | "poly" (DeepLab: (1 - t/T)^power)
    c.optimizer.power = 0.9          # the poly schedule's exponent
    c.optimizer.end_factor = 0.02    # the schedule decays to learning_rate * end_factor
    c.optimizer.weight_decay = 1e-4
    c.optimizer.momentum = 0.9
    c.optimizer.grad_clip_norm = 1.0  # 0 = no clipping
    c.optimizer.method_lr_mult = 1.0  # learning-rate multiplier of the layers outside the backbone
    c.optimizer.max_nonfinite_skips = 0  # >0: skip updates with non-finite gradients (optax.apply_if_finite)

    c.log_every = 10
    c.checkpoint_every = 100         # periodic checkpoints (and always at the last step)
    c.keep_checkpoints = 2           # periodic checkpoints kept (the best one is kept apart)
    c.eval_every = 0                 # validation during training (0 = only at the end)
    c.eval_at_end = True
    c.eval_batch_size = 8
    c.eval_batches = 4               # 0 = the whole split
    c.num_panels = 4
    c.trimap_widths = (2, 4)
    c.boundary_tolerance = 2
    c.statistics_batches = 4         # training batches used for dataset statistics (dilated)
    c.progress = True                # tqdm progress bar
    c.baseline_workdir = ""          # evaluate: add this run's predictions as the panels' baseline column
    # resuming a workdir refuses a config whose model/method/data/optimizer settings differ from the
    # run's (num_steps, frequencies and evaluation settings may change); True continues anyway
    # (the change is recorded in workdir/config_history.jsonl)
    c.allow_config_change = False
    # refinement protocol (rwseg.train.init_from): start the backbone from this run's checkpoint
    # ("WORKDIR" = its latest, "WORKDIR/best", "WORKDIR/checkpoints/STEP"); optimiser state fresh
    c.init_from = ""
    c.init_params = "backbone"       # "all": also the method's own layers (a second stage of the same method)
    c.freeze_backbone = False        # True: the backbone's parameters stay fixed (needs init_from)
    c.freeze_method = False          # True: the method's own layers stay fixed (needs init_params "all")
    return c


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A few-second configuration: tiny model, 32x32 crops, 5 steps, 1 eval batch."""
    c.data.crop_size = 32
    c.data.synthetic.num_train = 32
    c.data.synthetic.num_validation = 8
    c.data.synthetic.image_size = 32
    c.batch_size = 4
    c.num_steps = 5
    c.model.width = 8
    c.model.features = 16
    c.model.aspp_rates = (1, 2)
    c.optimizer.warmup_steps = 1
    c.log_every = 1
    c.checkpoint_every = 5
    c.eval_batch_size = 4
    c.eval_batches = 1
    c.num_panels = 2
    c.statistics_batches = 2
    c.progress = False
    return c


def finalize(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply the ``path:arg`` suffix of ``--config`` (only ``smoke`` is known)."""
    if arg in (None, ""):
        return c
    if arg != "smoke":
        raise ValueError(f"config argument: expected '' or 'smoke', got {arg!r}")
    return apply_smoke(c)
