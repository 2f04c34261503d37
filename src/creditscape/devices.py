"""An ensemble's members spread over the local devices (``jax.sharding``).

Members (seeds × learning rates) never interact, so a vmapped ensemble shards along its member
axis without communication: each device trains its share. Members are padded to a multiple of
the device count with copies of the last member, which compute exactly what it computes and are
dropped from every result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class MemberSharding:
    """The member axis of an ensemble laid over ``devices`` local devices (default: all)."""

    def __init__(self, devices: int | None = None):
        available = jax.local_devices()
        count = len(available) if devices is None else devices
        if not 1 <= count <= len(available):
            raise ValueError(f"devices = {count}, but this machine has {len(available)} "
                             f"({available[0].platform}); use a number from 1 to {len(available)}.")
        self.mesh = Mesh(np.array(available[:count]), ("members",))
        self.count = count

    def padded(self, members: int) -> int:
        """``members`` rounded up to a multiple of the device count."""
        return -(-members // self.count) * self.count

    def shard(self, tree):
        """Place every leaf split along its leading (member) axis."""
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec("members")))

    def replicate(self, tree):
        """Place every leaf whole on every device (data sets, shared batches)."""
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))


def pad_members(tree, total: int, axis: int = 0):
    """Repeat the last member along ``axis`` until there are ``total``."""

    def pad(a):
        extra = total - a.shape[axis]
        if extra == 0:
            return a
        xp = np if isinstance(a, np.ndarray) else jnp
        last = xp.take(a, xp.asarray([a.shape[axis] - 1]), axis=axis)
        return xp.concatenate([a, xp.repeat(last, extra, axis=axis)], axis=axis)

    return jax.tree.map(pad, tree)


def first_members(tree, count: int, axis: int = 0):
    """The first ``count`` members along ``axis`` (drops the padding)."""
    return jax.tree.map(lambda a: a[(slice(None),) * axis + (slice(count),)], tree)
