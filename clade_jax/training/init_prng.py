"""A counter-based hash PRNG for parameter initialisation: cheap for XLA to compile.

Why: a network's initialisation is one jit-compiled program with one sampler per parameter. With
JAX's threefry every sampler is an unrolled 20-round hash; with XLA's RngBitGenerator ("rbg")
XLA:CPU expands each call into a ~3,000-line Philox program. Either way the compile time grows
by 0.1-0.7 s per parameter on a 2-core CPU. The trainer's initialisation compiles in 6.2 s (tests'
tiny GAN) and 5.9 s (full-size ADE20k CLADE GAN) with this generator against 11.6 / 12.5 s with
rbg and 23.0 / 18.9 s with threefry (`benchmarks/init_compile.py`, RESULTS.md 2026-12-02 02:25).

The generator: a key is two uint32 words (k0, k1); element i of a draw is
`mix(k0, k1, i) = f(f(f(i ^ k0) + k1) ^ (k0 + 0x9E3779B9))`, f being MurmurHash3's 32-bit
finaliser (a bijection of uint32 with full avalanche), i.e. a few integer multiplies and shifts
per element that XLA fuses into one loop. 64-bit draws take counters 2i and 2i + 1. Keys derived
by `split` / `fold_in` hash (k0 ^ a per-operation constant, k1) at counters 2j and 2j + 1, so the
three uses of a key draw from separate streams. Seeding is threefry's (the seed's two 32-bit
halves). It is a statistical generator, not a cryptographic one: ample for initial weights (tests:
uniformity, independence of derived keys, the initialisers' moments). Training randomness
(dropout, the VAE's noise) keeps JAX's default threefry, whose values do not depend on how
the program is partitioned across devices; this one does not either (it hashes the global
element index), so a sharded initialisation draws the same weights as an unsharded one.

    key = jax.random.key(seed, impl=init_prng.IMPL)   # what `runtime.init_key` returns
"""

from __future__ import annotations

import math

import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)
_SPLIT = np.uint32(0x5EED5EED)  # domain separation of the derived keys' streams
_FOLD = np.uint32(0xF01D1234)


def _fmix32(x: jnp.ndarray) -> jnp.ndarray:
    """MurmurHash3's 32-bit finaliser (uint32 -> uint32, a bijection)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _mix(k0: jnp.ndarray, k1: jnp.ndarray, counter: jnp.ndarray) -> jnp.ndarray:
    x = _fmix32(counter ^ k0)
    x = _fmix32(x + k1)
    return _fmix32(x ^ (k0 + _GOLDEN))


def _counters(n: int) -> jnp.ndarray:
    return jnp.arange(n, dtype=jnp.uint32)


def _pair(k0: jnp.ndarray, k1: jnp.ndarray, counter: jnp.ndarray) -> jnp.ndarray:
    """Two words per counter value c: the hashes of 2c and 2c + 1 -> (..., 2)."""
    c = counter * np.uint32(2)
    return jnp.stack([_mix(k0, k1, c), _mix(k0, k1, c + np.uint32(1))], axis=-1)


def _seed(seed: jnp.ndarray) -> jnp.ndarray:
    return jex_random.threefry_prng_impl.seed(seed)  # (2,) uint32


def _split(key: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
    n = math.prod(shape)
    return _pair(key[0] ^ _SPLIT, key[1], _counters(n)).reshape(*shape, 2)


def _fold_in(key: jnp.ndarray, data: jnp.ndarray) -> jnp.ndarray:
    return _pair(key[0] ^ _FOLD, key[1], jnp.asarray(data, jnp.uint32))


def _random_bits(key: jnp.ndarray, bit_width: int, shape: tuple[int, ...]) -> jnp.ndarray:
    n = math.prod(shape)
    if bit_width == 64:
        words = _pair(key[0], key[1], _counters(n)).astype(jnp.uint64)  # (n, 2)
        return ((words[:, 0] << np.uint64(32)) | words[:, 1]).reshape(shape)
    bits = _mix(key[0], key[1], _counters(n)).reshape(shape)
    if bit_width == 32:
        return bits
    if bit_width in (8, 16):
        return bits.astype(jnp.uint8 if bit_width == 8 else jnp.uint16)
    raise ValueError(f"init_prng: bit width {bit_width} is not 8, 16, 32 or 64")


IMPL = jex_random.define_prng_impl(
    key_shape=(2,),
    seed=_seed,
    split=_split,
    random_bits=_random_bits,
    fold_in=_fold_in,
    name="clade_jax_init_hash32",
    tag="ih32",
)
