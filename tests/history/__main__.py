"""`python -m tests.history --minutes N --seed S`: run and check histories for N minutes."""

import argparse
import itertools
import sys

from tests.history.run import check_histories


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1, help="the first history's seed (then +1 each)")
    parser.add_argument("--restart", action="store_true", help="restart PostgreSQL once, mid-run")
    args = parser.parse_args()
    restart = None
    if args.restart:
        from tests.faults.test_database_restart import restart_postgresql

        restart = restart_postgresql
    report = check_histories(args.minutes * 60, itertools.count(args.seed), restart=restart)
    for failure in report.failures:
        print(failure)
    print(report.summary())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
