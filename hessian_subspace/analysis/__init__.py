"""The metric pipeline: train-state checkpoints stream through composable metric transforms
into result files that survive crashes.

The only model contract is the loss, ``loss_fn(params, batch)`` (or
``loss_fn(params, batch, state)`` with frozen model state), so any JAX model works: plain
functions of dict parameters, flax linen (``model.apply``), flax nnx (``nnx.split`` /
``nnx.merge``), Equinox (``eqx.partition``).

- Transforms (:mod:`.transforms`, :mod:`.builtins`): small values composed by :func:`chain`
  in the order given; the built-ins are the paper's measurements; a user's metric is a plain
  function of the :class:`Context` (:func:`transform`).
- Beyond the paper: other views of the curvature (:mod:`.views`) and the loss along chosen
  directions (:mod:`.directions`: :func:`loss_decrease`, the step's top and bulk parts;
  :func:`loss_landscape`, slices and surfaces) and the class structure of the top subspace
  (:mod:`.classes`: :func:`class_mean_subspace`, Papyan's decomposition), and GaLore's
  gradient projectors against the Hessian's blocks (:mod:`.galore`: :func:`galore_subspace`).
- The runner (:class:`Analyzer`): live from any training loop (``analyzer(step, params)``
  on a :class:`Schedule`), offline over a checkpoint source (:meth:`Analyzer.run`
  with :func:`orbax_checkpoints`), or following a live run (``watch=True``).
- The store (:mod:`.store`): atomic JSON records and npz arrays, checked on every start;
  corrupt files are moved aside and recomputed; :func:`read_results` reads them back. Every
  record carries the fingerprints of what it was computed from (:mod:`.fingerprints`:
  checkpoint content, loss, data, settings) and is reused only when all match; otherwise
  :class:`StaleResultsError`, or ``overwrite=True``.
- Drivers (:mod:`.drivers`): :meth:`Analyzer.run` over a source, finished or live; a run that
  analysed nothing raises, and failed checkpoints end it with :class:`FailedStepsError`.
- Specs (:mod:`.specs`): the analyzer's options in four small checked groups,
  :class:`Operator` (what is measured), :class:`Placement` (where), :class:`Schedule` (when)
  and :class:`Results` (what becomes of the records).
- Config (:mod:`.config`): the paper's analysis as one ``ml_collections`` config, a section
  per built-in whose fields are its factory's arguments, and :func:`config.build_chain`;
  ``launch/analyze.py`` reads it from the command line.
- Writers (:mod:`.writers`): scalars to CSV, TensorBoard, or any clu metric writer.
- Seeds (:mod:`.aggregate`): :func:`aggregate_runs` turns the records of several runs into
  per-step mean, std and min–max of every quantity.

Example::

    from hessian_subspace import analysis

    pipe = analysis.chain(analysis.loss(), analysis.gradient(), analysis.eigenpairs(k=20),
                          analysis.f_top(k=10), analysis.subspace_overlap(k=10))
    analyzer = analysis.Analyzer(pipe, loss_fn, data=analysis_set, results="results/run")
    analyzer.run(analysis.orbax_checkpoints("ckpts", like=params))
    records = analysis.read_results("results/run")
"""

from hessian_subspace.analysis import aggregate as aggregate
from hessian_subspace.analysis import builtins as builtins
from hessian_subspace.analysis import drivers as drivers
from hessian_subspace.analysis import fingerprints as fingerprints
from hessian_subspace.analysis import galore as galore
from hessian_subspace.analysis import classes as classes
from hessian_subspace.analysis import config as config
from hessian_subspace.analysis import directions as directions
from hessian_subspace.analysis import spectra as spectra
from hessian_subspace.analysis import specs as specs
from hessian_subspace.analysis import state as state
from hessian_subspace.analysis import step as step
from hessian_subspace.analysis import sources as sources
from hessian_subspace.analysis import store as store
from hessian_subspace.analysis import views as views
from hessian_subspace.analysis import writers as writers
from hessian_subspace.analysis.aggregate import aggregate_runs as aggregate_runs
from hessian_subspace.analysis.builtins import c2 as c2
from hessian_subspace.analysis.builtins import eigenpairs as eigenpairs
from hessian_subspace.analysis.builtins import f_top as f_top
from hessian_subspace.analysis.builtins import ggn as ggn
from hessian_subspace.analysis.builtins import gradient as gradient
from hessian_subspace.analysis.builtins import layers as layers
from hessian_subspace.analysis.builtins import loss as loss
from hessian_subspace.analysis.builtins import overlap_g_hg as overlap_g_hg
from hessian_subspace.analysis.builtins import subspace_overlap as subspace_overlap
from hessian_subspace.analysis.classes import class_mean_subspace as class_mean_subspace
from hessian_subspace.analysis.context import Context as Context
from hessian_subspace.analysis.directions import loss_decrease as loss_decrease
from hessian_subspace.analysis.directions import loss_landscape as loss_landscape
from hessian_subspace.analysis.context import MissingEntry as MissingEntry
from hessian_subspace.analysis.drivers import FailedStepsError as FailedStepsError
from hessian_subspace.analysis.galore import galore_subspace as galore_subspace
from hessian_subspace.analysis.runner import Analyzer as Analyzer
from hessian_subspace.analysis.sources import CheckpointError as CheckpointError
from hessian_subspace.analysis.sources import PeerLostError as PeerLostError
from hessian_subspace.analysis.sources import in_memory as in_memory
from hessian_subspace.analysis.sources import orbax_checkpoints as orbax_checkpoints
from hessian_subspace.analysis.spectra import dense_spectrum as dense_spectrum
from hessian_subspace.analysis.specs import Operator as Operator
from hessian_subspace.analysis.specs import Placement as Placement
from hessian_subspace.analysis.specs import Results as Results
from hessian_subspace.analysis.specs import Schedule as Schedule
from hessian_subspace.analysis.spectra import slq as slq
from hessian_subspace.analysis.spectra import trace as trace
from hessian_subspace.analysis.store import ResultStore as ResultStore
from hessian_subspace.analysis.store import StaleResultsError as StaleResultsError
from hessian_subspace.analysis.store import read_results as read_results
from hessian_subspace.analysis.transforms import Chain as Chain
from hessian_subspace.analysis.transforms import Stored as Stored
from hessian_subspace.analysis.transforms import at_steps as at_steps
from hessian_subspace.analysis.transforms import Transform as Transform
from hessian_subspace.analysis.transforms import chain as chain
from hessian_subspace.analysis.transforms import every as every
from hessian_subspace.analysis.transforms import transform as transform
from hessian_subspace.analysis.views import adam_preconditioned as adam_preconditioned
from hessian_subspace.analysis.views import block_spectra as block_spectra
from hessian_subspace.analysis.views import f_top_curve as f_top_curve
from hessian_subspace.analysis.writers import CSVWriter as CSVWriter
from hessian_subspace.analysis.writers import TensorBoardWriter as TensorBoardWriter
