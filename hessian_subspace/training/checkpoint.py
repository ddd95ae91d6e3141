"""This package's train-state checkpoints: an alias of :mod:`hessian_subspace.checkpoints`.

The format (orbax items ``model``/``optimizer``/``meta``, content checksums, reading and
writing) lives in :mod:`hessian_subspace.checkpoints`, below both training and the analysis;
this module keeps the names training code has always imported from here.
"""

from hessian_subspace.checkpoints import (CHECKSUM, META, MODEL, OPTIMIZER, CheckpointError,
                                          CheckpointWriter, checksum, list_steps, read_meta,
                                          run_checkpoints, verify)

__all__ = ["CHECKSUM", "META", "MODEL", "OPTIMIZER", "CheckpointError", "CheckpointWriter",
           "checksum", "list_steps", "read_meta", "run_checkpoints", "verify"]
