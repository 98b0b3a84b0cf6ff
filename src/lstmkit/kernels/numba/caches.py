"""The CPU's cache sizes, for the rules that ask whether weights stay in a core's L2.

    l2_bytes()          a core's L2 in bytes (DEFAULT_L2_BYTES where Linux's sysfs does not say)
    read_l2_bytes(root) cpu0's level-2 cache from sysfs, 0 where not found

The build machines have had 1 MiB (AMD EPYC, Zen 5), 1.25 MiB (Intel Ice Lake) and 2 MiB (Intel
Sapphire Rapids and later) of L2 a core; the rules measured on each say which (BENCHMARKS.md).
"""
from __future__ import annotations

import os

DEFAULT_L2_BYTES = 2 << 20  # where the L2's size is not known
_l2 = []  # [a core's L2 bytes], found once (tests set it)


def l2_bytes() -> int:
    """A core's L2 in bytes: read once from sysfs, DEFAULT_L2_BYTES where unknown."""
    if not _l2:
        _l2.append(read_l2_bytes() or DEFAULT_L2_BYTES)
    return _l2[0]


def read_l2_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """cpu0's level-2 cache in bytes, from Linux's sysfs; 0 where not found."""
    try:
        for index in sorted(os.listdir(root)):
            with open(os.path.join(root, index, "level"), encoding="ascii") as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(root, index, "size"), encoding="ascii") as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 0
