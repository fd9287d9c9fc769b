"""Unique ids without a system call each: ``uuid.uuid4()`` reads ``os.urandom``, which costs
hundreds of microseconds in some sandboxes — too much for an id per chain and per actor.

A process-wide generator seeded once from ``os.urandom`` gives random (version 4) UUIDs; they
are unique, not secret, which is all an actor URN or a chain id needs.
"""

from __future__ import annotations

import os
import random
import uuid

_rng = random.Random(os.urandom(32))
_pid = os.getpid()


def _reseed_if_forked() -> None:
    global _pid
    if os.getpid() != _pid:  # a forked child must not repeat its parent's ids
        _pid = os.getpid()
        _rng.seed(os.urandom(32))


def new_uuid() -> uuid.UUID:
    """A random version-4 UUID."""
    _reseed_if_forked()
    return uuid.UUID(int=_rng.getrandbits(128), version=4)


def new_hex() -> str:
    """``new_uuid().hex``: 32 hex digits."""
    return new_uuid().hex
