"""The same operator calls with and without ``jit`` (``chex.variants``), against numpy loops.

An operator must give the same numbers traced and eager (its eager checks, dtype
promotion and static arguments must not change the result), so each test runs twice:
``with_jit`` and ``without_jit``. Shapes and dtypes are asserted with chex.
"""

import chex
import jax.numpy as jnp
import numpy as np

from rwseg import metrics, spn, stencil


def _numpy_apply(w, x, offsets):
    """``y[i, j] = sum_k w[i, j, k] x[i + dy_k, j + dx_k]``, out-of-image entries skipped."""
    h, wd, _ = x.shape
    y = np.zeros_like(x)
    for i in range(h):
        for j in range(wd):
            for k, (dy, dx) in enumerate(offsets):
                if 0 <= i + dy < h and 0 <= j + dx < wd:
                    y[i, j] += w[i, j, k] * x[i + dy, j + dx]
    return y


def _numpy_top_to_bottom(x, p):
    """SPN's one-way recurrence top to bottom, one gate per pixel (eq. 1 of Liu et al.):
    ``h[t] = (1 - p[t]) x[t] + p[t] h[t - 1]`` down each column (``h[-1] = 0``: first row kept)."""
    h = np.zeros_like(x)
    for t in range(x.shape[0]):
        prev = h[t - 1] if t else 0.0
        gate = p[t, :, :, 0] if t else 0.0
        h[t] = (1 - gate) * x[t] + gate * prev
    return h


class OperatorVariantsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_stencil_apply(self):
        rng = np.random.default_rng(0)
        offsets = stencil.disk_offsets(2)
        w = rng.normal(size=(6, 7, len(offsets)))
        x = rng.normal(size=(6, 7, 3))
        y = self.variant(lambda w, x: stencil.apply(w, x, offsets))(jnp.asarray(w), jnp.asarray(x))
        chex.assert_shape(y, (6, 7, 3))
        chex.assert_type(y, jnp.float64)
        np.testing.assert_allclose(np.asarray(y), _numpy_apply(w, x, offsets), rtol=1e-12, atol=1e-12)
        y32 = self.variant(lambda w, x: stencil.apply(w, x, offsets))(jnp.asarray(w, jnp.float32),
                                                                     jnp.asarray(x, jnp.float32))
        chex.assert_type(y32, jnp.float32)  # float32 in, float32 out

    @chex.variants(with_jit=True, without_jit=True)
    def test_spn_propagate(self):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(5, 4, 2))
        gates = rng.uniform(-0.5, 0.9, size=(5, 4, 2, 1))
        h = self.variant(lambda x, g: spn.propagate(x, g, direction="top_to_bottom"))(jnp.asarray(x), jnp.asarray(gates))
        chex.assert_shape(h, x.shape)
        chex.assert_type(h, jnp.float64)
        np.testing.assert_allclose(np.asarray(h), _numpy_top_to_bottom(x, gates), rtol=1e-12, atol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    def test_confusion_matrix(self):
        rng = np.random.default_rng(2)
        labels = rng.integers(0, 4, size=(2, 5, 6))
        labels[0, 0, :3] = 255  # ignored pixels
        pred = rng.integers(0, 4, size=(2, 5, 6))
        cm = self.variant(lambda p, l: metrics.confusion_matrix(p, l, 4))(jnp.asarray(pred), jnp.asarray(labels))
        chex.assert_shape(cm, (4, 4))
        chex.assert_type(cm, int)
        valid = labels != 255
        want = np.bincount(4 * labels[valid] + pred[valid], minlength=16).reshape(4, 4)
        np.testing.assert_array_equal(np.asarray(cm), want)
