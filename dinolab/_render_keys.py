"""ShapesWorld renderer, part 1: sample keys and the hashed random streams (no global RNG anywhere).

``_sample_keys`` turns (split, seed, index) into a 32-bit key; ``_uniform`` hashes a key into as many
uniform numbers as needed; ``_appearance_keys`` gives the key that a re-rendered look is drawn from.
The overview of the renderer is in :mod:`dinolab._render`.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

_MAX_OBJECTS = 16  # object slots per scene: fixes the layout of the random streams below
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}  # stored in the top two bits of a sample key

# ----------------------------------------------------------------------------------------
# Integer hashing: the only source of randomness.
# Plain int64 tensor ops keep 32-bit values in range: every product is split so that it
# stays below 2**63, because signed overflow is not something to rely on.
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32, without int64 overflow (works on ints and tensors)."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _hash32(x):
    """The "lowbias32" integer hash: a bijection of [0, 2**32) (xorshifts and odd multiplies)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


# Stream ids: random number j of a sample is hash(key ^ _STREAM[j]).
_S_SCENE = 0  # 32 scene-level numbers
_S_OBJ = 32  # 32 numbers per object slot
_S_COARSE = 32 + 32 * _MAX_OBJECTS  # noise lattices follow
_G_COARSE, _G_FINE = 4, 24  # lattice cells per image side, whatever the size
_S_FINE = _S_COARSE + (_G_COARSE + 1) ** 2
_S_GRAIN = _S_FINE + (_G_FINE + 1) ** 2  # 4 * size numbers for the grain follow
# Which of the 32 numbers are layout (drawn from the sample key) and which are appearance (drawn
# from the appearance key, see _appearance_keys): scene numbers 0-7 and object numbers 0-4 are layout.
_SCENE_LAYOUT, _OBJECT_LAYOUT = 8, 5


@functools.lru_cache(maxsize=16)
def _streams(start: int, n: int) -> Tensor:
    return _hash32(torch.arange(start, start + n, dtype=torch.int64) + 0x2545F491)


_STREAM = _streams(0, _S_GRAIN)


def _uniform(keys: Tensor, streams: Tensor) -> Tensor:
    """Uniform [0, 1) float32 of shape keys.shape + streams.shape (24 bits, exact in float32)."""
    h = _hash32(keys.reshape(keys.shape + (1,) * streams.ndim) ^ streams)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _sample_keys(split: str, seed: int, indices: Tensor) -> Tensor:
    """Key of each sample: a bijection of (split, index) for a fixed seed (see dinolab.data's doc)."""
    seed_mix = _hash32(_hash32(seed & _M32) ^ _hash32(((seed >> 32) & _M32) ^ 0x68E31DA4))
    low = (indices ^ (seed_mix & 0x3FFFFFFF)) & 0x3FFFFFFF
    return _hash32((_SPLIT_IDS[split] << 30) | low)


def _appearance_keys(keys: Tensor, appearance: Tensor) -> Tensor:
    """The keys appearance is drawn from: ``keys`` itself where ``appearance`` is 0, else a hash of both."""
    return torch.where(appearance == 0, keys, _hash32(keys ^ _hash32((appearance & _M32) ^ 0x5BD1E995)))
