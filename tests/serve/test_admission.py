"""Admission on the API server (`serve.admission`): the per-request job cap and the in-flight request limit."""
from __future__ import annotations

import pytest

from ds_vicuna.serve.admission import Admission
from ds_vicuna.serve.errors import APIError, ErrorCode


def test_too_many_jobs_in_one_request_is_a_400_naming_the_limit_and_the_parameter():
    admission = Admission(max_jobs_per_request=64)
    admission.check_jobs(64, 8, 8)  # at the limit: fine
    with pytest.raises(APIError) as caught:
        admission.check_jobs(512, 64, 8)
    err = caught.value
    assert err.code is ErrorCode.INVALID_VALUE and err.code.status == 400 and err.param == "n"
    assert "512" in err.message and "64" in err.message and "--max-jobs-per-request" in err.message
    with pytest.raises(APIError) as caught:
        admission.check_jobs(65, 65, 1)
    assert caught.value.param == "prompt"


def test_requests_past_the_limit_are_429_until_a_place_is_given_back():
    admission = Admission(max_running_requests=2)
    first, second = admission.enter(), admission.enter()
    with pytest.raises(APIError) as caught:
        admission.enter()
    assert caught.value.code is ErrorCode.QUEUE_FULL and caught.value.headers() == {"Retry-After": "1"}
    first.close()
    first.close()  # giving a place back twice frees it once
    assert admission.running_requests() == 1
    with admission.enter():
        assert admission.running_requests() == 2
    second.close()
    assert admission.running_requests() == 0


@pytest.mark.parametrize("field", ["max_jobs_per_request", "max_running_requests"])
@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_bad_limits_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        Admission(**{field: value})
