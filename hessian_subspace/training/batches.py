"""The SGD mini-batch order: a pure function of ``(step, seed)``, so a resumed run sees exactly
the batches of an uninterrupted one."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.setflags(write=False)
    return perm


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the SGD mini-batch at ``step``: a function of the step number alone.

    Each epoch of ``num_examples // batch_size`` steps walks a fresh permutation
    ``np.random.default_rng([seed, epoch]).permutation(num_examples)`` in consecutive blocks; the
    last ``num_examples % batch_size`` examples of each permutation are dropped. A run resumed at
    ``step`` therefore sees exactly the batches of an uninterrupted run.

    >>> import numpy as np
    >>> epoch = [batch_indices(10, 5, step, seed=0) for step in (0, 1)]
    >>> sorted(np.concatenate(epoch).tolist()) == list(range(10))
    True
    >>> bool(np.array_equal(batch_indices(10, 5, 7, seed=0), batch_indices(10, 5, 7, seed=0)))
    True

    Args:
      num_examples: n, the training set size.
      batch_size: examples per batch, ``1 <= batch_size <= n``.
      step: the step number, >= 0.
      seed: seed of the data order.

    Returns:
      int64 indices, shape ``(batch_size,)``.
    """
    if num_examples < 1 or step < 0:
        raise ValueError(f"need num_examples >= 1 and step >= 0, got {num_examples}, {step}.")
    if not 1 <= batch_size <= num_examples:
        raise ValueError(f"`batch_size` must be in 1..{num_examples} (num_examples), got "
                         f"{batch_size}.")
    steps_per_epoch = num_examples // batch_size
    epoch, i = divmod(int(step), steps_per_epoch)
    perm = _epoch_permutation(int(num_examples), int(seed), epoch)
    return perm[i * batch_size:(i + 1) * batch_size].copy()
