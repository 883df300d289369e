"""Packed documents: with segment_ids, every mixer's output for a document equals running that
document alone (no state or attention crosses a change of id): test_contract.py's check, forward
and gradients, over the configurations its option table does not reach."""
import pytest

from tests.memzoo import test_contract as contract

# The configurations besides test_contract.py's (s4d conv, s5, attention with its options).
CASES = [
    ("s4d", dict(state_size=8, mode="recurrent")),
    ("s4d", dict(state_size=8, mode="recurrent", bidirectional=True)),
    ("s4d", dict(state_size=8, bidirectional=True)),
    ("s5", dict(state_size=8, bidirectional=True)),
    ("attention", dict(num_heads=4, num_kv_heads=2, window=4, conv_size=3)),
]


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_packed_equals_separate(name, options):
    contract.check_packed_equals_alone(name, options)
