"""host_memory.keep_freed_memory: a large block freed and allocated again is served without new page faults."""

import os
import platform
import subprocess
import sys

import pytest

# Allocates, touches and frees a 64 MiB block (over glibc's largest mmap threshold, as XLA:CPU's temporaries are)
# twice, and prints the page faults of the second time.
_SCRIPT = """
import resource, sys
import numpy as np
from clipgen_jax import host_memory
if sys.argv[1] == "keep" and not host_memory.keep_freed_memory():
    sys.exit("keep_freed_memory was not applied")

def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(64 << 20, np.uint8)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_fresh_block()
print(faults_of_a_fresh_block())
"""


def _second_block_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mallopt settings are glibc's")
def test_a_freed_block_is_reused_without_page_faults():
    fresh = _second_block_faults("default")
    kept = _second_block_faults("keep")
    # 64 MiB is 16384 pages of 4 KiB, or as few as 32 huge pages: numpy asks for transparent huge pages (544 faults
    # on the development machine).
    assert fresh >= 32, fresh
    assert kept < fresh / 10, (kept, fresh)
