"""Which mixture component serves which position: pure functions of (seed, weights, block).

Positions are cut into blocks of `block_size` counted from an origin. The first T positions hold
each component's largest-remainder share of T, for every block boundary T, so no component's
count ever strays from its weight by more than a block; inside a block the slots are permuted.
"""

from __future__ import annotations

import dataclasses
import fractions
import hashlib
import math
from collections.abc import Sequence

import numpy as np

from resumax import order
from resumax.errors import ConfigError

MIN_BLOCK = 1024
MAX_BLOCK = 2**20


def integer_weights(weights: Sequence[float]) -> tuple[int, ...]:
    """The weights as coprime integers in the same exact ratio (floats are exact binary fractions).

    Exact integers make every share below a pure integer function, the same on every machine.
    """
    exact = [fractions.Fraction(weight) for weight in weights]
    denominator = math.lcm(*(value.denominator for value in exact))
    numerators = [int(value * denominator) for value in exact]
    divisor = math.gcd(*numerators)
    return tuple(numerator // divisor for numerator in numerators)


def block_size_for(shares: Sequence[int]) -> int:
    """The smallest power of two >= MIN_BLOCK in which every component gets at least one slot.

    A component whose weight fills less than one slot per block could lose a slot from one block
    boundary to the next (largest remainder is not monotone below that), so blocks grow instead.
    """
    needed = -(-sum(shares) // min(shares))
    size = max(MIN_BLOCK, 1 << (needed - 1).bit_length())
    if size > MAX_BLOCK:
        raise ConfigError(
            f"mixture weights in the ratio {list(shares)} give the smallest component less than "
            f"1/{MAX_BLOCK} of the positions; raise its weight or leave it out of the mixture"
        )
    return size


def allocation(shares: Sequence[int], total: int) -> np.ndarray:
    """How many of the first `total` positions each component gets: its largest-remainder share.

    Each count is the floor or the ceiling of weight * total; the leftover positions go to the
    largest remainders, ties to the earlier component. The counts sum to `total`.
    """
    weight_sum = sum(shares)
    quotients = [share * total // weight_sum for share in shares]
    remainders = [share * total % weight_sum for share in shares]
    leftover = total - sum(quotients)
    by_remainder = sorted(range(len(shares)), key=lambda c: (-remainders[c], c))
    for component in by_remainder[:leftover]:
        quotients[component] += 1
    return np.array(quotients, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """One block: the component at each slot, its rank among that component's slots in the block,
    and each component's draws in all earlier blocks (from the origin)."""

    components: np.ndarray
    ranks: np.ndarray
    before: np.ndarray


def block_seed(seed: int, origin: int, block: int) -> int:
    """The permutation seed of a block, a hash of (mixture seed, origin, block index)."""
    digest = hashlib.blake2b(f"{seed}:{origin}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def block_layout(
    shares: Sequence[int], block_size: int, block: int, *, seed: int, origin: int, shuffle: bool
) -> BlockLayout:
    """The layout of block `block` after the origin: O(block_size), whatever the block index.

    shuffle=True permutes the block's slots with a seeded Feistel bijection (`resumax.order`);
    False spreads each component's slots evenly through the block.
    """
    before = allocation(shares, block * block_size)
    counts = allocation(shares, (block + 1) * block_size) - before
    slots = np.repeat(np.arange(len(shares), dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    if shuffle:
        slot_order = order.permute(
            np.arange(block_size), block_size, block_seed(seed, origin, block)
        )
    else:
        rank_in_component = np.arange(block_size) - np.repeat(starts, counts)
        centres = (2 * rank_in_component + 1) / (2 * np.repeat(counts, counts))
        slot_order = np.lexsort((slots, centres))
    components = slots[slot_order]
    ranks = np.empty(block_size, dtype=np.int64)
    ranks[np.argsort(components, kind="stable")] = np.arange(block_size) - np.repeat(starts, counts)
    return BlockLayout(components, ranks, before)
