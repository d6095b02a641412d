"""The predictor keeps freed memory for the next ranking instead of faulting it in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from mmrank.predictors.allocator import keep_freed_memory

    kept = keep_freed_memory(int(sys.argv[1]))

    def ranking():
        temporaries = [np.ones(1 << 17) for _ in range(8)]  # 8 x 1 MiB, written, then freed
        del temporaries

    ranking()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        ranking()
    print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def page_faults(keep_mib: int) -> tuple[bool, int]:
    """(whether the setting took, minor page faults of 20 rankings after the first) in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(keep_mib)], capture_output=True, text=True, check=True, timeout=60
    )
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


def test_kept_memory_is_reused_where_glibc_defaults_fault_it_in_again() -> None:
    taken, kept_faults = page_faults(128)
    untouched, default_faults = page_faults(0)
    assert taken and not untouched
    # glibc as it comes trims the 8 MiB back to the kernel after every ranking: ~2,000 faults each
    assert default_faults > 20 * 1000, default_faults
    assert kept_faults < default_faults / 20, (kept_faults, default_faults)
