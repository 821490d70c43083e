"""A short run of the fuzzer in every test run (the script runs it for as long as you like)."""

from tests.fuzz.fuzz_inputs import run


def test_a_short_fuzz_run_finds_nothing() -> None:
    counts = run(seconds=2.0, seed=1234)
    assert all(n > 100 for n in counts.values())
