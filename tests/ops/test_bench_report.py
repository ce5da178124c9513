"""`machine_info`: every benchmark report names the CPU it ran on, by model and by the SIMD
level torch dispatched to, so numbers from different machines are never compared blind."""

from __future__ import annotations

import platform

import torch

from ops.bench._report import cpu_model_name, machine_info

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu avx2

processor\t: 1
model name\t: AMD EPYC 7B13 64-Core Processor
"""


def test_cpu_model_name_is_the_first_model_name_line(tmp_path):
    """The value after the colon, stripped, from /proc/cpuinfo's format."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    assert cpu_model_name(cpuinfo) == "AMD EPYC 7B13 64-Core Processor"


def test_cpu_model_name_falls_back_without_cpuinfo(tmp_path):
    """No /proc/cpuinfo (not Linux): whatever the platform module reports."""
    assert cpu_model_name(tmp_path / "missing") == (platform.processor() or "")


def test_machine_info_records_the_cpu_model_and_capability():
    """The report's meta carries this machine's CPU model name and torch's CPU capability."""
    info = machine_info()
    assert info["cpu"] == cpu_model_name()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
