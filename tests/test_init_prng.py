"""The parameter-initialisation PRNG (`clade_jax.training.init_prng`): uniform bits, independent
streams for derived keys and for keys differing in either word, determinism under jit and
sharding, every bit width, and the trainer's initialisers' moments with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from clade_jax.layers.conv import XAVIER_GAIN, Conv2d
from clade_jax.training import init_prng, runtime

N = 1 << 16


def _uniform(key, n: int = N) -> np.ndarray:
    return np.asarray(jax.random.uniform(key, (n,)), np.float64)


def _bits(key, n: int = N) -> np.ndarray:
    return np.asarray(jax.random.bits(key, (n,), jnp.uint32))


def _chi2_uniform(u: np.ndarray, bins: int = 64) -> float:
    counts = np.histogram(u, bins=bins, range=(0.0, 1.0))[0]
    expected = len(u) / bins
    return float(np.sum((counts - expected) ** 2) / expected)


def _max_correlation(streams: list[np.ndarray]) -> float:
    c = np.corrcoef(np.stack(streams))
    return float(np.max(np.abs(c[~np.eye(len(streams), dtype=bool)])))


def test_init_key_is_the_hash_generator():
    key = runtime.init_key(0)
    assert jax.random.key_impl(key) == init_prng.IMPL
    assert jax.random.key_data(key).shape == (2,)


def test_draws_are_uniform_bit_by_bit_and_in_histogram():
    key = runtime.init_key(3)
    # 63 degrees of freedom: mean 63, standard deviation 11.2; 130 is six deviations out.
    assert _chi2_uniform(_uniform(key)) < 130
    bits = _bits(key)
    ones = np.array([np.mean((bits >> b) & 1) for b in range(32)])
    assert np.all(np.abs(ones - 0.5) < 5 * 0.5 / np.sqrt(N)), ones  # every bit is fair
    assert len(np.unique(bits)) > 0.99 * N  # ~0.5 collisions expected among 2^16 of 2^32


def test_derived_and_neighbouring_keys_draw_independent_streams():
    key = runtime.init_key(0)
    folded = [jax.random.fold_in(key, i) for i in range(4)]
    split = list(jax.random.split(key, 4))
    seeds = [runtime.init_key(s) for s in (0, 1, 2)]
    base = jax.random.fold_in(key, 1000)  # not among the keys above (init_key(1) is [0, 1])
    data = np.asarray(jax.random.key_data(base))
    # keys that differ in one word only: the hash must mix both words into every draw
    word0 = jax.random.wrap_key_data(data ^ np.array([1, 0], np.uint32), impl=init_prng.IMPL)
    word1 = jax.random.wrap_key_data(data ^ np.array([0, 1], np.uint32), impl=init_prng.IMPL)
    keys = [key, *folded, *split, *seeds[1:], base, word0, word1]
    streams = [_uniform(k) for k in keys]
    assert _max_correlation(streams) < 5 / np.sqrt(N)
    # no stream is a shifted copy of another (a counter reused across derivations)
    for a, b in ((key, folded[0]), (key, split[0]), (folded[0], split[0]), (base, word1)):
        x, y = _bits(a), _bits(b)
        assert not np.intersect1d(x[:4096], y).size > 8, (a, b)
    derived = np.stack([np.asarray(jax.random.key_data(k)) for k in folded + split])
    assert len({tuple(r) for r in derived}) == len(derived)


def test_jit_eager_and_sharded_draws_are_identical():
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    key = runtime.init_key(7)
    eager = np.asarray(jax.random.normal(key, (64, 24)))
    jitted = np.asarray(jax.jit(lambda k: jax.random.normal(k, (64, 24)))(key))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
    sharded = jax.jit(
        lambda k: jax.random.normal(k, (64, 24)),
        out_shardings=NamedSharding(mesh, PartitionSpec("data")),
    )(key)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(eager, jitted)
    np.testing.assert_array_equal(eager, np.asarray(sharded))
    assert not np.array_equal(eager, np.asarray(jax.random.normal(runtime.init_key(8), (64, 24))))


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.uint16, jnp.uint32])
def test_every_bit_width(dtype):
    bits = np.asarray(jax.random.bits(runtime.init_key(1), (4, 1024), dtype))
    assert bits.dtype == dtype and bits.shape == (4, 1024)
    top = np.iinfo(dtype).bits - 1
    assert 0.45 < np.mean((bits >> top) & 1) < 0.55  # the high bit is used
    assert len(np.unique(bits)) > min(0.5 * bits.size, 0.9 * 2 ** np.iinfo(dtype).bits)


def test_64_bit_draws_combine_two_independent_words():
    with jax.enable_x64(True):
        bits = np.asarray(jax.random.bits(runtime.init_key(1), (N,), jnp.uint64))
    assert bits.dtype == np.uint64
    hi, lo = (
        (bits >> np.uint64(32)).astype(np.float64),
        (bits & np.uint64(0xFFFFFFFF)).astype(np.float64),
    )
    assert abs(np.corrcoef(hi, lo)[0, 1]) < 5 / np.sqrt(N)
    assert abs(np.mean(hi) / 2**32 - 0.5) < 0.01 and abs(np.mean(lo) / 2**32 - 0.5) < 0.01


def test_the_layers_initialisers_draw_their_distributions_with_it():
    """The official xavier normal (gain 0.02) of a 3x3 64 -> 64 kernel, and a standard normal."""
    conv = Conv2d(64, 64, 3, padding=1, rngs=nnx.Rngs(runtime.init_key(0)))
    w = np.asarray(conv.kernel[...], np.float64)
    fan_in, fan_out = 9 * 64, 9 * 64
    expected = XAVIER_GAIN * np.sqrt(2.0 / (fan_in + fan_out))
    assert abs(np.std(w) / expected - 1) < 0.03 and abs(np.mean(w)) < 0.03 * expected
    z = np.asarray(jax.random.normal(runtime.init_key(5), (N,)), np.float64)
    assert abs(np.mean(z)) < 5 / np.sqrt(N) and abs(np.std(z) - 1) < 0.02
    # tails as a normal's: P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027
    assert abs(np.mean(np.abs(z) > 2) - 0.0455) < 0.005
    assert abs(np.mean(np.abs(z) > 3) - 0.0027) < 0.0012
