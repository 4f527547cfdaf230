"""Strict numbers (pure): ASCII digits only, ranges checked, one grammar per kind of number.

Issue 23, finding 9: Python's int() takes fullwidth digits, '+', '_' and spaces, so
`allow c \uff11:\uff11\uff11` equalled `allow c 1:11` and a text-matching admission policy could be
dodged. Finding 2: classid halves were not range-checked (`1:10001` became 1:1).
"""

from __future__ import annotations

import argparse

import pytest

from pelagos_bpf.cli import flags
from pelagos_bpf.devices.rules import CgroupDeviceRule as R
from pelagos_bpf.devices.rules import parse_rule
from pelagos_bpf.errors import ConfigError
from pelagos_bpf.net.plan import validate_priorities
from pelagos_bpf.numbers import env_int, parse_classid, parse_dec, parse_hex, parse_int

LOOKALIKES = (
    "\uff11",
    "+1",
    "1_0",
    " 1",
    "1 ",
    "\u00b2",
    "\u0661",
    "0x1",
    "",
    "-0",
    "1.0",
    "1e3",
    "\u20031",
)


@pytest.mark.parametrize("text", LOOKALIKES)
def test_decimal_is_ascii_digits_only(text: str) -> None:
    with pytest.raises(ConfigError, match="ASCII digits only"):
        parse_dec(text, "x")


def test_decimal_and_signed_ranges() -> None:
    assert parse_dec("0010", "x") == 10
    assert parse_dec("4294967295", "x") == 0xFFFF_FFFF
    with pytest.raises(ConfigError, match=r"out of range 0\.\.4294967295"):
        parse_dec("4294967296", "x")
    assert parse_int("-1", "x", -1, 10) == -1
    for bad in ("+1", "--1", "- 1", "\uff0d1", "1_000"):
        with pytest.raises(ConfigError, match="ASCII digits"):
            parse_int(bad, "x", -1, 10)


def test_hex_halves_are_u16() -> None:
    assert parse_hex("ffff", "x") == 0xFFFF
    for bad in ("10001", "fffff"):
        with pytest.raises(ConfigError, match=r"out of range 0\.\.0xffff"):
            parse_hex(bad, "x")
    for bad in ("\uff11", "+1", "0x1", "g", ""):
        with pytest.raises(ConfigError, match="hexadecimal"):
            parse_hex(bad, "x")


def test_classid_forms_and_refusals() -> None:
    assert parse_classid("1:10", "c") == 0x10010
    assert parse_classid(" 1:10\t", "c") == 0x10010  # ASCII blanks around are dropped
    assert parse_classid("0x10010", "c") == 0x10010
    assert parse_classid("65552", "c") == 0x10010
    for bad in (
        "1:10001",
        "10000:1",
        "\uff11:\uff11\uff10",
        "+1:10",
        "1:1_0",
        "1: 10",
        "\u20031:10",
        "1:10:2",
    ):
        with pytest.raises(ConfigError) as e:
            parse_classid(bad, "c")
        assert e.value.setting == "c"


def test_env_int(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PELAGOS_T", "")
    assert env_int("PELAGOS_T", 7) == 7
    monkeypatch.setenv("PELAGOS_T", "\uff11\uff12")
    with pytest.raises(ConfigError, match="PELAGOS_T"):
        env_int("PELAGOS_T", 7)
    monkeypatch.setenv("PELAGOS_T", "0")
    with pytest.raises(ConfigError, match=r"out of range 1\.\."):
        env_int("PELAGOS_T", 7)


@pytest.mark.parametrize(
    "text",
    [
        "allow c \uff11:\uff11\uff11",
        "allow c 1:\uff11\uff11",
        "allow c +1:11",
        "allow c 1_0:1",
        "allow c 1:11\u2003rw",
        "allow\u00a0c 1:11",
        "allow c -1:3",
        "allow c 4096:1",
        "allow c 1:1048576",
        "allow c 1:11 rw\x1f",
    ],
)
def test_rule_grammar_refuses_lookalikes(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_rule(text)
    assert e.value.setting == "device rule"
    with pytest.raises(ConfigError):
        R.parse(text)  # the same grammar
    with pytest.raises(argparse.ArgumentTypeError):
        flags.parse_device_rule(text)  # and the CLI's --device


def test_rule_grammar_accepts_the_printed_form() -> None:
    for rule in (R(True, "c", 1, 11), R(False, "a"), R(True, "b", 8, -1, "r")):
        assert parse_rule(str(rule)) == rule
    assert parse_rule("allow\tc  1:11 ") == R(True, "c", 1, 11)


def test_cli_numbers() -> None:
    assert flags.parse_classid("1:10") == 0x10010
    assert flags.parse_net_prio("eth0=5") == ("eth0", 5)
    assert flags.parse_throttle("8:0=1M") == (8, 0, 1 << 20)
    assert flags.parse_int("-1") == -1
    for fn, bad in (
        (flags.parse_classid, "1:10001"),
        (flags.parse_classid, "\uff11:\uff11\uff10"),
        (flags.parse_net_prio, "eth0=\u00b2"),
        (flags.parse_net_prio, "eth0=+5"),
        (flags.parse_throttle, "\uff18:0=1M"),
        (flags.parse_int, "1_0"),
        (flags.parse_cpu_quota, "\uff150000/100000"),
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)


@pytest.mark.parametrize(
    "prio, why",
    [(0x10000, "names the qdisc 1: itself"), (0xFFFF0001, "root"), (0xFFFF0000, "root")],
)
def test_library_priorities_refuse_what_names_no_class(prio: int, why: str) -> None:
    """Library callers may pick classes by priority (u32), but not a qdisc itself."""
    with pytest.raises(ConfigError, match=why) as e:
        validate_priorities([("eth0", prio)])
    assert e.value.setting == "net_priorities[0]"
    validate_priorities([("eth0", 0x10010), ("lo", 0xFFFF), ("eth1", 0)])
