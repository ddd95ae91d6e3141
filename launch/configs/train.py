r"""A training run of the paper: FC 784-100-100-10, ReLU, SGD (η = 0.1, batch 64) on MNIST.

  python -m launch.train --config=launch/configs/train.py --workdir=runs/fc_mnist
  # offline, on Fashion-MNIST IDX files:
  python -m launch.train --config=launch/configs/train.py:fashion_idx --workdir=runs/fc_fmnist
  # on the Gaussian mixture of §3, in seconds:
  python -m launch.train --config=launch/configs/train.py:smoke --workdir=/tmp/smoke
  # any field can be overridden:
  python -m launch.train --config=launch/configs/train.py --workdir=runs/x \
      --config.optimizer.name=adam --config.optimizer.learning_rate=1e-3 \
      --config.data.label_transform=shuffle --config.num_steps=5000 \
      --config.model.kwargs.initializer=he_normal \
      --config.checkpoint_schedule=1:100,10:1000,100

Arguments after the colon: "fashion_idx" (../shared/data/fashion-mnist), "smoke" (Gaussian
mixture, 3 classes, 60 steps: a few seconds on a CPU).
"""

from hessian_subspace.paper import experiment


def get_config(arg: str | None = None):
    config = experiment.default_config()
    # The kernel initialiser, overridable (hessian_subspace.paper.models.INITIALIZERS).
    config.model.kwargs.initializer = "lecun_truncated_normal"
    if arg == "fashion_idx":
        config.data.name = "idx:../shared/data/fashion-mnist"
    elif arg == "smoke":
        config.data.name = "gaussian_mixture"
        config.data.kwargs = dict(num_classes=3, dim=20, num_examples=600, sigma=0.3)
        config.model.kwargs.hidden = (16, 16)
        config.num_steps = 60
        config.batch_size = 32
        config.checkpoint_schedule = "1:10,10"
        config.log_every = 20
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use fashion_idx or smoke")
    return config
