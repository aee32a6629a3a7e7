"""bench/common.machine: the host line every peer bench prints first, read from cpuinfo."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import common

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC 9B45
flags\t\t: fpu sse2 avx2 fma avx512f avx512vl avx512_bf16 avx512_vp2intersect

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: another core
flags\t\t: fpu sse2
"""


def test_machine_reads_the_first_processor_and_its_kernel_extensions():
    line = common.machine(CPUINFO)
    assert line["metric"] == "machine"
    assert (line["cpu"], line["cpu_family"], line["cpu_model"]) == ("AMD EPYC 9B45", 26, 2)
    # Only the extensions the matrix kernels choose among, sorted; avx512vl and
    # avx512_vp2intersect are not among them.
    assert line["vector_extensions"] == ["avx2", "avx512_bf16", "avx512f", "fma"]
    assert line["cores"] == len(os.sched_getaffinity(0))
    assert line["jax"].count(".") >= 2


def test_machine_without_cpuinfo_says_unknown():
    line = common.machine("")
    assert (line["cpu"], line["cpu_family"], line["cpu_model"]) == ("unknown", None, None)
    assert line["vector_extensions"] == []
