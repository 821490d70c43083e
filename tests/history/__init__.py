"""The history checker: random concurrent histories against real servers, checked against the
definition of the merge (`checker`). Run by `tests/test_history.py` in CI (about a minute, fixed
seeds) and on demand: `python -m tests.history --minutes 10 --seed 1 [--restart]`."""
