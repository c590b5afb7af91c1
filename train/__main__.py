"""python -m train: see `python -m train --help`."""

import sys

from train import loop
from train.config import from_args


def main(argv=None) -> int:
  try:
    run = from_args(argv)
    loop.run(run)
  except ValueError as e:  # bad input: data, config, devices, a mismatched checkpoint
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
