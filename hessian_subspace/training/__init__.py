"""Training with optax and orbax, for flax linen models: a resumable loop with checkpoints on a
schedule (:mod:`.loop`), the task losses and the analysis contract of a linen model
(:mod:`.tasks`), the deterministic batch order (:mod:`.batches`), checkpoints with content
checksums (:mod:`.checkpoint`), and optax transformations in the top Hessian subspace
(:mod:`.optim`: Dom-SGD / Bulk-SGD projections, low-rank Newton)."""

from hessian_subspace.training import batches as batches
from hessian_subspace.training import checkpoint as checkpoint
from hessian_subspace.training import loop as loop
from hessian_subspace.training import optim as optim
from hessian_subspace.training import tasks as tasks
from hessian_subspace.training.loop import CHECKPOINT_DIR as CHECKPOINT_DIR
from hessian_subspace.training.loop import TRAIN_LOG as TRAIN_LOG
from hessian_subspace.training.loop import CheckpointSchedule as CheckpointSchedule
from hessian_subspace.training.loop import TrainState as TrainState
from hessian_subspace.training.loop import evaluate as evaluate
from hessian_subspace.training.loop import init_train_state as init_train_state
from hessian_subspace.training.loop import make_optimizer as make_optimizer
from hessian_subspace.training.loop import make_train_step as make_train_step
from hessian_subspace.training.loop import read_train_log as read_train_log
from hessian_subspace.training.loop import train as train
