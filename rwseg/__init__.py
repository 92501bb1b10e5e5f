"""rwseg: affinity-based segmentation operators in JAX/Flax.

Operators are pure functions on one image, channels last (``(H, W, C)``), batched
with ``jax.vmap``; they compose under ``jit``, ``vmap`` and ``grad``. See README.md.
"""

__version__ = "0.1.0"
