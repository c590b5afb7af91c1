"""python -m train: see `python -m train --help`."""

import sys


def init_distributed(coordinator=None, num_processes=None, process_id=None, distributed=False):
  """Joins the other processes before any computation, when asked to."""
  import jax
  from train.config import UsageError
  if coordinator or num_processes or process_id is not None:
    if not (coordinator and num_processes and process_id is not None):
      raise UsageError('multi-host needs all of --coordinator HOST:PORT, --num-processes N and '
                       '--process-id I')
    if not 0 <= process_id < num_processes:
      raise UsageError(f'--process-id {process_id} is not in [0, {num_processes})')
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif distributed:
    jax.distributed.initialize()


def main(argv=None) -> int:
  try:
    # Imported here: Ctrl-C while JAX loads is caught below too.
    from train import loop
    from train.config import UsageError, from_args
    try:
      run, distributed = from_args(argv)
      init_distributed(**distributed)
      loop.run(run)
    except UsageError as e:  # bad input: data, options, devices, a mismatched checkpoint
      print(f'error: {e}', file=sys.stderr)
      return 2
  except KeyboardInterrupt:  # before the loop's own handlers are installed
    print('interrupted before training began; nothing to save', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
