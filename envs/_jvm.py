"""What the JVM-backed families (sciworld, twx) share: a heap cap for the JVM about to start, and whether it exited.

Both packages start their JVM through py4j's launch_gateway, which inherits os.environ at that moment, so the cap
goes into JAVA_TOOL_OPTIONS for the start only and is restored after: a JVM another family starts later must not
inherit this one's cap.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

EXIT_GRACE_S = 2.0  # a socket error can arrive a moment before the JVM's exit is visible


@contextmanager
def java_heap(heap: str) -> Iterator[None]:
    """JAVA_TOOL_OPTIONS with `-Xmx<heap>` and the serial GC while the block runs, unless the user's options set
    their own heap / GC."""
    before = os.environ.get("JAVA_TOOL_OPTIONS")
    opts = (before or "").split()
    if not any(o.startswith("-Xmx") for o in opts):
        opts.append(f"-Xmx{heap}")
    if not any(o.startswith("-XX:+Use") and o.endswith("GC") for o in opts):
        opts.append("-XX:+UseSerialGC")
    os.environ["JAVA_TOOL_OPTIONS"] = " ".join(opts)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("JAVA_TOOL_OPTIONS", None)
        else:
            os.environ["JAVA_TOOL_OPTIONS"] = before


def exited(proc: Any, grace_s: float = EXIT_GRACE_S) -> bool:
    """Whether the JVM process has exited (waiting up to `grace_s`)."""
    try:
        proc.wait(timeout=grace_s)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: it is alive
        return False
    return True
