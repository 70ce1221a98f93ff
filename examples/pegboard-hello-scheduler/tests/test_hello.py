"""The hello policy passes pegboard's conformance kit and orders by service received."""

from pegboard.sdk import Request, SamplingParams
from pegboard.sdk.testing import check_scheduler
from pegboard_hello_scheduler import HelloScheduler


def test_conforms_to_the_scheduler_contract():
    check_scheduler(HelloScheduler)
    check_scheduler(HelloScheduler, {"prompt_weight": 0.5})


def test_least_served_request_comes_first():
    served, fresh = Request([1, 2]), Request([1, 2])
    served.append_token(3)
    policy = HelloScheduler()
    assert sorted([served, fresh], key=policy.sort_key) == [fresh, served]


def test_prompt_weight_counts_prompt_tokens():
    long, short = Request(list(range(10)), SamplingParams()), Request([1], SamplingParams())
    policy = HelloScheduler(HelloScheduler.Options(prompt_weight=1.0))
    assert sorted([long, short], key=policy.sort_key) == [short, long]
