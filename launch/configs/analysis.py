r"""What ``launch/analyze.py`` measures, and for your own model where the loss, the data and the
checkpoints come from.

The fields are :func:`hessian_subspace.analysis.config.default_config`'s: one section per
transform whose fields are its factory's arguments, ``operator`` for the curvature operator, and
``k``. Any field can be overridden:

  python -m launch.analyze --workdir=runs/fc --config.k=20 --config.eigenpairs.tol=1e-4 \
      --config.transforms=loss,gradient,eigenpairs,f_top,slq --config.slq.steps=0,1000

Your own model's orbax checkpoints, without a script (``source``: ``module:attribute`` names,
imported from the working directory and ``PYTHONPATH``):

  python -m launch.analyze --results=results/mine --config.k=10 \
      --config.source.checkpoints=ckpts --config.source.loss=my_model:loss \
      --config.source.data=my_model:analysis_set --config.source.params=my_model:init_params
"""

import ml_collections
from ml_collections.config_dict import placeholder

from hessian_subspace.analysis import config as analysis_config


def get_config(arg: str | None = None):
    del arg
    config = analysis_config.default_config()
    config.source = ml_collections.ConfigDict(dict(
        # A directory of orbax checkpoints (orbax.checkpoint.CheckpointManager) of your model;
        # without it, --workdir names a run of launch.train.
        checkpoints=placeholder(str),
        loss=placeholder(str),  # loss_fn(params, batch) -> mean loss
        # The analysis set: a pytree of arrays with a leading example axis, or a function of
        # no arguments returning one.
        data=placeholder(str),
        # The parameters' structure: a pytree of arrays or jax.ShapeDtypeStructs, or a function
        # of no arguments returning one (evaluated abstractly: nothing is initialised).
        params=placeholder(str),
        test_data=placeholder(str),  # optional: a test set, like `data`
        # Optional: metrics(params, batch) -> {"loss": ..., "accuracy": ...} for "loss".
        metrics=placeholder(str),
        # Optional, for the Gauss-Newton matrix: outputs(params, batch) and
        # output_loss(outputs, batch).
        output_fn=placeholder(str),
        output_loss=placeholder(str),
        # Where the parameters are in a checkpoint: orbax item name, and key path inside it
        # ("/"-joined), as hessian_subspace.analysis.orbax_checkpoints takes them.
        item=placeholder(str),
        params_key=placeholder(str),
    ))
    return config
