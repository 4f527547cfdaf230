"""Reading rules back from stored entries (what `inspect` shows) decides like the original.

Pure: the table is built by the same encoder the kernel maps are filled from
(encode_rules -> resolve); the live round trip is in test_cli.py."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pelagos_bpf.config import CgroupDeviceRule
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, device_allowed
from pelagos_bpf.devices.encode import decode_rules, encode_rules, resolve

MAJORS = (1, 8, 240)
MINORS = (0, 3, 7)


def _read_back(rules: list[CgroupDeviceRule]) -> list[CgroupDeviceRule]:
    return decode_rules(resolve(encode_rules(rules)))


def test_plain_lists_come_back_unchanged() -> None:
    rules = [CgroupDeviceRule.parse(t) for t in ("allow c 1:3 rw", "deny b 8:* m", "deny c *:5")]
    assert _read_back(rules) == rules


def test_overridden_bits_are_not_shown() -> None:
    """Rule 0 denies m, but rules 1 and 2 allow m for every b and c node: 0 keeps only rw."""
    back = _read_back(list(DEFAULT_DEVICE_RULES))
    assert str(back[0]) == "deny a *:* rw"
    assert back[1:] == list(DEFAULT_DEVICE_RULES[1:])
    gone = [CgroupDeviceRule.parse("deny c 1:3 r"), CgroupDeviceRule.parse("allow c 1:3 r")]
    assert _read_back(gone) == [gone[1]]
    split = [CgroupDeviceRule.parse("deny a *:* rwm"), CgroupDeviceRule.parse("allow c *:* w")]
    assert [str(r) for r in _read_back(split)] == [
        "deny b *:* rwm",
        "deny c *:* rm",
        "allow c *:* w",
    ]


rule_st = st.builds(
    CgroupDeviceRule,
    allow=st.booleans(),
    kind=st.sampled_from("abc"),
    major=st.sampled_from((-1, *MAJORS)),
    minor=st.sampled_from((-1, *MINORS)),
    access=st.sampled_from(("r", "w", "m", "rw", "rm", "wm", "rwm")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(rule_st, max_size=10))
def test_read_back_rules_decide_like_the_originals(rules: list[CgroupDeviceRule]) -> None:
    back = _read_back(rules)
    for kind in "bc":
        for major in (*MAJORS, 9):
            for minor in (*MINORS, 9):
                for acc in ("r", "w", "m", "rw"):
                    assert device_allowed(back, kind, major, minor, acc) == device_allowed(
                        rules, kind, major, minor, acc
                    ), (kind, major, minor, acc, [str(r) for r in back])
