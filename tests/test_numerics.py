"""rwseg._numerics: the one safe division and masked mean of the operator modules."""

import jax
import jax.numpy as jnp
import numpy as np

from rwseg._numerics import channel_scale, masked_mean, safe_divide


def test_safe_divide_values_fill_and_finite_gradient():
    num = jnp.array([1.0, 2.0, 3.0, 0.0])
    den = jnp.array([2.0, 0.0, -4.0, 0.0])
    np.testing.assert_array_equal(safe_divide(num, den), [0.5, 0.0, -0.75, 0.0])
    out = safe_divide(num, den, jnp.nan)
    assert np.isnan(out[1]) and np.isnan(out[3]) and out[0] == 0.5
    g_num, g_den = jax.grad(lambda a, b: safe_divide(a, b).sum(), argnums=(0, 1))(num, den)
    np.testing.assert_allclose(g_num, [0.5, 0.0, -0.25, 0.0])
    np.testing.assert_allclose(g_den, [-0.25, 0.0, -3 / 16, 0.0])
    assert safe_divide(jnp.float32(1), jnp.float32(3)).dtype == jnp.float32


def test_masked_mean_against_numpy_and_empty_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5))
    m = rng.random((4, 5)) < 0.4
    np.testing.assert_allclose(masked_mean(x, m), x[m].mean(), rtol=1e-12)
    x_nan = np.where(m, x, np.nan)  # values outside the mask never leak, not even NaN
    np.testing.assert_allclose(masked_mean(x_nan, m), x[m].mean(), rtol=1e-12)
    g = jax.grad(lambda a: masked_mean(a, m))(jnp.asarray(x_nan))
    np.testing.assert_allclose(g, np.where(m, 1 / m.sum(), 0.0))
    none = np.zeros_like(m)
    assert float(masked_mean(x, none)) == 0.0
    assert np.isnan(masked_mean(x, none, empty=jnp.nan))
    assert masked_mean(jnp.ones((3,), jnp.float32), jnp.array([True, False, True])).dtype == jnp.float32
    # integer values are promoted to a float mean; a (H, W, 1) mask broadcasts over channels
    assert float(masked_mean(jnp.array([1, 2, 4]), jnp.array([1, 1, 0]))) == 1.5
    v = rng.normal(size=(3, 4, 2))
    mk = rng.random((3, 4, 1)) < 0.5
    np.testing.assert_allclose(masked_mean(v, mk), v[np.broadcast_to(mk, v.shape)].mean(), rtol=1e-12)


def test_channel_scale_is_the_per_channel_max_and_never_zero_or_nan():
    x = jnp.asarray([[[1.0, 0.0, -3.0]], [[-2.0, 0.0, jnp.nan]]])
    np.testing.assert_array_equal(channel_scale(x), [2.0, 1.0, 1.0])
    assert float(channel_scale(jnp.asarray([-4.0, 1.0]))) == 4.0
