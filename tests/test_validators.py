"""The field validators: what each accepts and refuses (bools are never counts, NaN and inf never numbers), the
words of their refusals, and a declarative table's problems named field by field."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from diffsynth_cog.validators import (
    BOOLEAN,
    EXISTING_PATH,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    divisor_of,
    divisors,
    integer,
    is_int,
    is_number,
    number,
    one_of,
    pair,
    sequence_of,
    table_problems,
)


def test_a_bool_is_neither_an_int_nor_a_number_and_nan_or_inf_is_no_number():
    assert is_int(3) and not is_int(True) and not is_int(3.0) and not is_int("3")
    assert is_number(2.5) and is_number(-1) and not is_number(False)
    assert not is_number(math.nan) and not is_number(math.inf) and not is_number(None)


@pytest.mark.parametrize(
    "check,good,bad,words",
    [
        (POSITIVE_INT, [1, 7], [0, -1, 1.0, True, None], "an integer >= 1"),
        (NON_NEGATIVE_INT, [0, 5], [-1, False], "an integer >= 0"),
        (integer(2, 4), [2, 3, 4], [1, 5], "an integer in [2, 4]"),
        (number(0, 1, low_open=True), [1e-9, 1, 0.5], [0, 1.0001, math.nan, True], "a number in (0, 1]"),
        (number(0, 1, high_open=True), [0, 0.999], [1, -0.1], "a number in [0, 1)"),
        (number(0), [0, 3.5, 10**6], [-1e-9, math.inf], "a number >= 0"),
        (number(high=2, high_open=True), [-5, 1.9], [2, 2.5], "a number < 2"),
        (one_of(("a", "b")), ["a", "b"], ["c", None, ["a"]], "one of ['a', 'b']"),
        (divisor_of(12, "the 12 heads"), [1, 3, 12], [5, 24, 0, True], "(valid: [1, 2, 3, 4, 6, 12])"),
        (BOOLEAN, [True, False], [0, 1, "true"], "true or false"),
        (sequence_of(POSITIVE_INT, "a list of counts"), [(), [1, 2], (3,)], [[0], "12", [1, True]], "a list of counts"),
        (pair(integer(), "[lo, hi]", lambda p: p[0] <= p[1]), [(1, 2), (3, 3)], [(2, 1), [1, 2], (1,)], "[lo, hi]"),
    ],
)
def test_each_check_accepts_and_refuses_and_says_what_it_expects(check, good, bad, words):
    assert all(check(v) for v in good), [v for v in good if not check(v)]
    assert not any(check(v) for v in bad), [v for v in bad if check(v)]
    assert words in check.expected


def test_refusals_name_the_field_the_expectation_and_the_value():
    assert POSITIVE_INT.problem("lora_rank", 0) == "lora_rank: expected an integer >= 1, got 0"
    assert POSITIVE_INT.problem("lora_rank", 4) is None
    with pytest.raises(KeyError, match="ring_degree must be an integer >= 1; got True"):
        POSITIVE_INT.require("ring_degree", True, KeyError)
    assert POSITIVE_INT.require("ring_degree", 2) == 2
    optional = POSITIVE_INT.or_none("= the rest")
    assert optional(None) and optional(3) and not optional(0)
    assert optional.expected == "an integer >= 1 or None (= the rest)"
    assert POSITIVE_INT.described("a count").problem("n", -1) == "n: expected a count, got -1"


def test_divisors_are_listed_in_order():
    assert divisors(30) == [1, 2, 3, 5, 6, 10, 15, 30]
    assert divisors(1) == [1] and divisors(7) == [1, 7]


def test_existing_path_checks_the_disk(tmp_path):
    (tmp_path / "here.txt").write_text("x")
    assert EXISTING_PATH(tmp_path / "here.txt") and EXISTING_PATH(str(tmp_path))
    assert not EXISTING_PATH(tmp_path / "gone.txt") and not EXISTING_PATH("") and not EXISTING_PATH(3)


def test_a_table_reports_every_bad_field_in_table_order():
    @dataclass
    class Job:
        steps: object
        rate: object
        mode: object

    table = {"steps": POSITIVE_INT, "rate": number(0, 1, low_open=True), "mode": one_of(("fast", "exact"))}
    assert table_problems(Job(3, 0.5, "fast"), table) == []
    assert table_problems(Job(0, 0.5, "slow"), table) == [
        "steps: expected an integer >= 1, got 0",
        "mode: expected one of ['fast', 'exact'], got 'slow'",
    ]
