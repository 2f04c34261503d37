"""An ensemble's members spread over the local devices (``jax.sharding``).

Members (seeds × learning rates) never interact, so a vmapped ensemble shards along its member
axis without communication: each device trains its share. Members are padded to a multiple of
the device count with copies of the last member, which compute exactly what it computes and are
dropped from every result.

When there are at least twice as many devices as members (one seed on a CPU split into one host
device per core), the spare devices may share each member's minibatch instead: a mesh ("members",
"batch") whose batch axis splits a minibatch into equal parts, each device forms the estimate of
its part, and one mean over the axis per iteration gives the member's gradient (training only;
``train.batch_parts`` decides when).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def one_host_device_per_core() -> None:
    """Split a CPU into one XLA host device per core, unless ``XLA_FLAGS`` already gives a count.

    Call it before JAX starts its backend (XLA reads the flag then); it does nothing on an
    accelerator. One XLA CPU device keeps about one core busy on creditscape's small programs, so
    members, or the parts of one member's minibatch, train in parallel over the host devices
    (docs/scale.md)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if HOST_DEVICES_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICES_FLAG}={len(os.sched_getaffinity(0))}".strip()


class MemberSharding:
    """The member axis of an ensemble laid over ``devices`` local devices (default: all).

    The members are spread over ``devices`` (padded to a multiple of them), or by default over all
    local devices but no more than the ``members``. With ``batch_split`` = k > 1, each of the
    ``members`` instead has k devices that split its minibatch (``members`` × k of them in use;
    when to split is :func:`creditscape.train.batch_parts`'s decision).
    """

    def __init__(self, devices: int | None = None, members: int | None = None, batch_split: int = 1):
        available = jax.local_devices()
        count = len(available) if devices is None else devices
        if not 1 <= count <= len(available):
            raise ValueError(f"devices = {count}, but this machine has {len(available)} "
                             f"({available[0].platform}); use a number from 1 to {len(available)}.")
        if batch_split > 1:
            if members is None or members * batch_split > count:
                raise ValueError(f"{members} members with batch_split = {batch_split} need more than {count} devices.")
            member_devices = members
        elif devices is None and members is not None:  # (by default no padding copies)
            member_devices = min(count, members)
        else:
            member_devices = count
        self.mesh = Mesh(np.array(available[:member_devices * batch_split]).reshape(member_devices, batch_split),
                         ("members", "batch"))
        self.count = member_devices * batch_split  # devices in use
        self.batch_split = batch_split

    def padded(self, members: int) -> int:
        """``members`` rounded up to a multiple of the devices along the member axis."""
        along = self.mesh.shape["members"]
        return -(-members // along) * along

    def shard(self, tree):
        """Place every leaf split along its leading (member) axis (whole on each device of a batch split)."""
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
