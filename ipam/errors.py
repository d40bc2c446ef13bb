"""Errors of the IPAM library; each message names the value at fault."""

from __future__ import annotations


class IPAMError(Exception):
    """Base of every IPAM error."""


class PoolExhausted(IPAMError):
    """No free address is left in the pools a request may use."""


class BlockLimitReached(IPAMError):
    """The node owns max_blocks_per_host blocks and needs another one."""


class AddressInUse(IPAMError):
    """A specific address is already allocated (to another handle)."""


class AddressReserved(IPAMError):
    """A specific address lies in an IPReservation."""


class NotInPool(IPAMError):
    """An address or requested pool is not part of any (enabled) IP pool."""


class MaxRetries(IPAMError):
    """Compare-and-swap writes kept losing to concurrent writers."""
