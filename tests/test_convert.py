"""Conversions pinned with the peers' vectors (runc / crun / youki; docs/OCI.md cites each)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pelagos_bpf import convert
from pelagos_bpf.errors import ConfigError


@pytest.mark.parametrize(
    ("shares", "weight"),
    [(0, 0), (1, 1), (2, 1), (512, 59), (1024, 100), (2048, 174), (262144, 10000), (10**6, 10000)],
)
def test_shares_to_weight_anchor_vectors(shares: int, weight: int) -> None:
    assert convert.shares_to_weight(shares) == weight


def test_shares_to_weight_exact_powers_are_not_rounded_up() -> None:
    # 1024 -> exactly 10^2 and 262144 -> 10^4 in exact arithmetic: float noise must not add 1.
    assert convert.shares_to_weight(1024) == 100
    assert convert.shares_to_weight(262143) == 10000


@given(st.integers(min_value=3, max_value=262143))
def test_shares_to_weight_monotone_and_in_range(shares: int) -> None:
    w = convert.shares_to_weight(shares)
    assert 1 <= w <= 10000
    assert w >= convert.shares_to_weight(shares - 1)
    lg = math.log2(shares)
    exact = 10 ** ((lg * lg + 125 * lg) / 612 - 7 / 34)
    assert w - 1 < exact + 1e-9 and exact - 1e-9 <= w


@pytest.mark.parametrize(("w", "io"), [(10, 1), (1000, 10000), (500, 4950), (100, 910)])
def test_blkio_weight_to_io_weight(w: int, io: int) -> None:
    assert convert.blkio_weight_to_io_weight(w) == io == 1 + (w - 10) * 9999 // 990


@pytest.mark.parametrize(
    ("swap", "mem", "out"),
    [
        (0, -1, -1),
        (-1, 100, -1),
        (0, 100, 0),
        (-1, None, -1),
        (500, -1, 500),
        (300, 100, 200),
        (100, 100, 0),
    ],
)
def test_swap_to_v2(swap: int, mem: int | None, out: int) -> None:
    assert convert.swap_to_v2(swap, mem) == out


@pytest.mark.parametrize(
    ("swap", "mem", "msg"),
    [
        (200, None, "without memory limit"),
        (200, 0, "without memory limit"),
        (200, -5, "invalid memory limit"),
        (50, 100, ">= memory_limit"),
    ],
)
def test_swap_to_v2_errors_name_memory_swap(swap: int, mem: int | None, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg) as e:
        convert.swap_to_v2(swap, mem)
    assert e.value.setting == "memory_swap"
    assert e.value.value == swap


def test_cpu_max_and_pids_max() -> None:
    assert convert.cpu_max(50000, 100000) == "50000 100000"
    assert convert.cpu_max(-1, 100000) == "max 100000"
    assert convert.cpu_max(20000) == "20000 100000"
    assert convert.pids_max(64) == "64"
    assert convert.pids_max(-1) == "max"
    assert convert.limit_str(-1) == "max"
    assert convert.limit_str(4096) == "4096"


def test_io_max_lines_group_per_device() -> None:
    lines = convert.io_max_lines(
        read_bps=[(8, 0, 1048576), (7, 1, 10)],
        write_bps=[(8, 0, 2097152)],
        read_iops=[(8, 0, 100)],
        write_iops=[(7, 1, 5)],
    )
    assert [line for _, line, _ in lines] == [
        "8:0 rbps=1048576 wbps=2097152 riops=100",
        "7:1 rbps=10 wiops=5",
    ]
    assert lines[0][0] == (8, 0)
    assert lines[1][2] == ["blkio_throttle_read_bps", "blkio_throttle_write_iops"]
    assert convert.io_max_lines() == []


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("256M", 256 << 20),
        ("1G", 1 << 30),
        ("512k", 512 << 10),
        ("512K", 512 << 10),
        ("4096", 4096),
        ("1.5g", 3 << 29),
        ("64MiB", 64 << 20),
        ("10MB", 10 << 20),
        ("-1", -1),
        ("max", -1),
    ],
)
def test_parse_size(text: str, n: int) -> None:
    assert convert.parse_size(text) == n


@pytest.mark.parametrize("text", ["", "M", "12X", "-5", "1..2M", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        convert.parse_size(text)


def test_format_size() -> None:
    assert convert.format_size(0) == "0 B"
    assert convert.format_size(1023) == "1023 B"
    assert convert.format_size(256 << 20) == "256.0 MiB"
    assert convert.format_size(3 << 29) == "1.5 GiB"
    assert convert.format_size(-1) == "max"


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_then_parse_is_close(n: int) -> None:
    text = convert.format_size(n).replace(" ", "").replace("iB", "").replace("B", "")
    back = convert.parse_size(text)
    assert abs(back - n) <= max(1, n * 0.06)


def test_blkio_weight_zero_is_unset() -> None:
    """runc ConvertBlkIOToIOWeightValue(0) == 0 (moby writes weight 0); the formula gave -100."""
    assert convert.blkio_weight_to_io_weight(0) == 0


@pytest.mark.parametrize(
    ("quota", "text"), [(-9999, "max"), (-500, "max"), (-1, "max"), (0, "max")]
)
def test_cpu_max_non_positive_quota_is_max(quota: int, text: str) -> None:
    """runc fs2, crun and youki write "max" for any quota <= 0 (youki contest -9999/-500)."""
    assert convert.cpu_max(quota, 100000) == f"{text} 100000"


@pytest.mark.parametrize(("limit", "text"), [(0, "0"), (-1, "max"), (-7, "max"), (1, "1")])
def test_pids_max_zero_is_a_real_limit(limit: int, text: str) -> None:
    """runtime-spec v1.3; runc 1.4 (opencontainers/cgroups #48) writes 0 as 0."""
    assert convert.pids_max(limit) == text


@pytest.mark.parametrize(
    ("text", "size", "name"),
    [
        ("64KB", 64 << 10, "64KB"),
        ("2MB", 2 << 20, "2MB"),
        ("1GB", 1 << 30, "1GB"),
        ("2048KB", 2 << 20, "2MB"),
        ("16GB", 16 << 30, "16GB"),
    ],
)
def test_hugepage_sizes(text: str, size: int, name: str) -> None:
    """runtime-spec: base 1024; kernel file names as mm/hugetlb_cgroup.c mem_fmt."""
    assert convert.hugepage_size(text) == size
    assert convert.hugetlb_name(size) == name


@pytest.mark.parametrize("text", ["2M", "2mb", "MB", "0MB", "1.5MB", " 2MB", "2TB"])
def test_hugepage_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        convert.hugepage_size(text)


def test_io_max_duplicate_device_last_rate_wins() -> None:
    lines = convert.io_max_lines([(8, 0, 1), (8, 16, 5), (8, 0, 2)], [(8, 0, 3)])
    assert [ln for _, ln, _ in lines] == ["8:0 rbps=2 wbps=3", "8:16 rbps=5"]
