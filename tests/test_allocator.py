"""glibc's allocator in a Train worker: freed ZeRO-3 layers go back to the system, nothing else pays for it."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh process (the setting is for the whole process): free one 4 MiB block, then ask for another. glibc's
# default then serves it from its heap (the threshold rose to the freed block's size), a fixed threshold maps it.
PROBE = r"""
import ctypes, sys
from vitray.config import smoke
from vitray.train.engine import return_freed_layers

class Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
cfg = smoke().replace(deepspeed=dict(zero_stage=int(sys.argv[1])))
assert not return_freed_layers(cfg, on_gpu=True)  # GPU memory has its own allocator; the host's is left alone
set_here = return_freed_layers(cfg, on_gpu=False)
first = bytearray(4 << 20)
del first
before = libc.mallinfo2().hblkhd
second = bytearray(4 << 20)
print(set_here, libc.mallinfo2().hblkhd - before >= 4 << 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
@pytest.mark.parametrize("stage, fixed", [(3, True), (2, False), (1, False)])
def test_only_zero3_on_cpu_has_freed_blocks_returned_to_the_system(stage, fixed):
    out = subprocess.run([sys.executable, "-c", PROBE, str(stage)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True).stdout.split()
    assert out == [str(fixed), str(fixed)]  # set here, and a block of a freed block's size is a fresh mapping
