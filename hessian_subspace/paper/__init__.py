"""The paper, as a user of the toolkit: its models, data, training runs, experiments and figures.

Gur-Ari, Roberts & Dyer, "Gradient Descent Happens in a Tiny Subspace" (arXiv:1812.04754).
:mod:`.models` (flax linen: FC nets, the Keras ConvNet, ResNet-18), :mod:`.data` (tfds, IDX
files, the Gaussian mixture and sine regression), :mod:`.experiment` (configs to library
calls, the analysis of a run), :mod:`.reproduce` and :mod:`.summaries` (every experiment:
train, analyse, plot), :mod:`.figures` (every figure and Table 1 from result files),
:mod:`.toy_model` and :mod:`.toy_claims` (§3 against its analytic solution). The paper's models
reach the pipeline through the same loss contract as anyone's
(:func:`hessian_subspace.training.tasks.inference_loss`).
"""
