"""Is this file descriptor a network namespace? (nsfs files look like empty regular files,
and /proc/self/fd shows their bind-mount path, so only the kernel can tell.)"""

from __future__ import annotations

import fcntl

NS_GET_NSTYPE = 0xB703  # linux/nsfs.h: _IO(0xb7, 0x3)
CLONE_NEWNET = 0x40000000


def is_netns(fd: int) -> bool:
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:  # ENOTTY: not an nsfs file at all
        return False
