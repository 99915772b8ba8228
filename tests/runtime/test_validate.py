"""One rule for integer options everywhere: bools and floats are refused, the field is named."""
from __future__ import annotations

import numpy as np
import pytest

from detector_server.client import DetectorClient
from detector_server.errors import DataError, InputError
from detector_server.preprocess import PreprocessSpec
from detector_server.runtime import resolve_threads
from detector_server.server import ServeConfig
from detector_server.validate import check_int, check_number, is_int


@pytest.mark.parametrize("value, ok", [(3, True), (np.int64(3), True), (0, True), (True, False),
                                       (np.bool_(True), False), (3.0, False), ("3", False),
                                       (None, False)])
def test_is_int(value, ok):
    assert is_int(value) is ok


def test_check_int_bounds_and_message():
    assert check_int(5, "n", minimum=1, maximum=5) == 5
    with pytest.raises(InputError, match=r"field 'n'.*an integer in \[1, 4\], got 5"):
        check_int(5, "n", minimum=1, maximum=4)
    with pytest.raises(InputError, match="a positive integer, got True"):
        check_int(True, "n", minimum=1)
    with pytest.raises(DataError, match="an integer >= 0"):
        check_int(-1, "n", minimum=0, error=DataError)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "1"])
def test_check_number_refuses_non_finite_and_non_numbers(value):
    with pytest.raises(InputError, match="finite number"):
        check_number(value, "lr", above=0)


# Each of these accepted True before there was one validator.
@pytest.mark.parametrize("make, field", [
    (lambda: ServeConfig(max_batch=True), "max_batch"),
    (lambda: ServeConfig(stream_window=True), "stream_window"),
    (lambda: DetectorClient("127.0.0.1:1", max_batch=True), "max_batch"),
    (lambda: DetectorClient("127.0.0.1:1", retries=False), "retries"),
    (lambda: PreprocessSpec(size=True, mean=(0, 0, 0), std=(1, 1, 1)), "size"),
    (lambda: resolve_threads(True), "threads"),
])
def test_bool_is_not_an_integer_option(make, field):
    with pytest.raises(InputError, match=f"field '{field}'"):
        make()
