"""Instance ids like the real server's: ``uuid1().hex``, whose last 12 hex digits are the node's MAC.

The seed's HAProxy routes GET/DELETE by that suffix, and so does the balancer,
so every instance of one worker must carry the same one.
"""

from __future__ import annotations

import random
import re
import uuid

_MAC_HEX = re.compile(r"[0-9a-f]{12}")


def parse_mac(text: str) -> int:
    """``aa:bb:cc:dd:ee:ff``, ``aa-bb-…`` or ``aabbccddeeff`` → the 48-bit integer."""
    digits = re.sub(r"[:\-.]", "", text.strip().lower())
    if not _MAC_HEX.fullmatch(digits):
        raise ValueError(f"{text!r} is not a MAC address (aa:bb:cc:dd:ee:ff or 12 hex digits)")
    return int(digits, 16)


def random_mac(rng: random.Random | None = None) -> int:
    """A random unicast, locally administered MAC (like a pod's veth), so it clashes with no real NIC."""
    value = (rng or random.SystemRandom()).getrandbits(48)
    first = (value >> 40) & 0xFF
    first = (first | 0x02) & ~0x01 & 0xFF
    return (first << 40) | (value & 0xFF_FFFF_FFFF)


def mac_hex(mac: int) -> str:
    return f"{mac:012x}"


class InstanceIds:
    """Hands out ids for one worker (one MAC)."""

    def __init__(self, mac: int) -> None:
        self.mac = mac

    @property
    def suffix(self) -> str:
        return mac_hex(self.mac)

    def new(self) -> str:
        return uuid.uuid1(node=self.mac).hex
