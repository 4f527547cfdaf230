"""Strict numbers from text: ASCII digits only, ranges checked, one clear error.

Why: Python's int() takes Unicode digits (FULLWIDTH DIGIT ONE is 1), signs, surrounding spaces
and '_' separators, and str.isdigit() accepts SUPERSCRIPT TWO, which int() then rejects. Input
from pod authors (annotations) and node settings (environment) must mean exactly one thing to
every reader, including an admission policy that matches text: a rule written in fullwidth
digits must not equal `allow c 1:11`.
"""

from __future__ import annotations

import os

from .errors import ConfigError

_HEX = frozenset("0123456789abcdefABCDEF")


def _digits(text: object) -> bool:
    """ASCII 0-9 only, at least one (for ASCII text, str.isdigit() is exactly that)."""
    return isinstance(text, str) and text.isascii() and text.isdigit()


def parse_dec(text: str, setting: str, lo: int = 0, hi: int = 0xFFFF_FFFF) -> int:
    """A decimal integer in [lo, hi] written with ASCII digits only (no sign, space or '_')."""
    if not _digits(text):
        raise ConfigError(setting, text, "want a decimal number (ASCII digits only)")
    n = int(text)
    if not lo <= n <= hi:
        raise ConfigError(setting, text, f"out of range {lo}..{hi}")
    return n


def parse_int(text: str, setting: str, lo: int, hi: int) -> int:
    """parse_dec that also takes a leading '-' (flags where -1 means "unlimited")."""
    if not (_digits(text) or (isinstance(text, str) and text[:1] == "-" and _digits(text[1:]))):
        raise ConfigError(setting, text, "want an integer (ASCII digits, optional leading '-')")
    n = int(text)
    if not lo <= n <= hi:
        raise ConfigError(setting, text, f"out of range {lo}..{hi}")
    return n


def parse_hex(text: str, setting: str, hi: int = 0xFFFF) -> int:
    """A hexadecimal integer in [0, hi] (tc's MAJ:MIN halves), ASCII hex digits only."""
    if not isinstance(text, str) or not text or not _HEX.issuperset(text):
        raise ConfigError(setting, text, "want a hexadecimal number (ASCII 0-9, a-f only)")
    n = int(text, 16)
    if n > hi:
        raise ConfigError(setting, text, f"out of range 0..{hi:#x}")
    return n


def parse_classid(text: str, setting: str) -> int:
    """ "1:10" (MAJ:MIN in hex, each half a u16, as tc and HTB handles), "0x10010" (hex) or
    "65552" (decimal) -> the u32 classid. Nothing else: no signs, spaces inside, '_' or
    non-ASCII digits; a half above 0xffff is refused, never wrapped into the other. Only ASCII
    blanks around it are dropped (str.strip would drop any Unicode space too)."""
    s = text.strip(" \t") if isinstance(text, str) else text
    if isinstance(s, str) and ":" in s:
        major, _, minor = s.partition(":")
        return (parse_hex(major, setting) << 16) | parse_hex(minor, setting)
    if isinstance(s, str) and s[:2] in ("0x", "0X"):
        return parse_hex(s[2:], setting, 0xFFFF_FFFF)
    return parse_dec(s, setting)


def env_int(name: str, default: int, lo: int = 1, hi: int = 0xFFFF_FFFF) -> int:
    """A node setting from the environment (unset or empty: `default`), parsed strictly."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return parse_dec(raw, name, lo, hi)
