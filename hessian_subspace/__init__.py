"""hessian_subspace: where gradient descent moves in parameter space.

Jitted Hessian-vector products, a jitted Lanczos eigensolver and the metrics of
Gur-Ari, Roberts & Dyer, "Gradient Descent Happens in a Tiny Subspace" (arXiv:1812.04754).

The package root is the pure numerical core (JAX and NumPy only): :mod:`curvature`,
:mod:`blocks`, :mod:`krylov`, :mod:`tracking`, :mod:`spectrum`, :mod:`metrics`, and for device
meshes :mod:`sharding` and :mod:`layout`. The
subpackages build on it: :mod:`hessian_subspace.analysis` (the metric pipeline: checkpoints
through composable transforms into result files), :mod:`hessian_subspace.training` (optax
training loop, orbax checkpoints, optimisers in the top subspace) and
:mod:`hessian_subspace.paper` (the paper's models, data, experiments and figures). Import them
explicitly: ``from hessian_subspace import analysis``.
"""

from hessian_subspace import blocks as blocks
from hessian_subspace import curvature as curvature
from hessian_subspace import krylov as krylov
from hessian_subspace import layout as layout
from hessian_subspace import metrics as metrics
from hessian_subspace import preconditioned as preconditioned
from hessian_subspace import sharding as sharding
from hessian_subspace import spectrum as spectrum
from hessian_subspace import tracking as tracking
from hessian_subspace.blocks import RestrictedOperator as RestrictedOperator
from hessian_subspace.blocks import restrict as restrict
from hessian_subspace.gauss_newton import GGNOperator as GGNOperator
from hessian_subspace.curvature import HessianOperator as HessianOperator
from hessian_subspace.gauss_newton import dataset_ggn as dataset_ggn
from hessian_subspace.curvature import dataset_hvp as dataset_hvp
from hessian_subspace.curvature import dataset_mean as dataset_mean
from hessian_subspace.curvature import dataset_value_and_grad as dataset_value_and_grad
from hessian_subspace.curvature import dense_hessian as dense_hessian
from hessian_subspace.curvature import dense_matrix as dense_matrix
from hessian_subspace.gauss_newton import ggn_vp as ggn_vp
from hessian_subspace.curvature import hvp as hvp
from hessian_subspace.krylov import Eigenpairs as Eigenpairs
from hessian_subspace.krylov import LanczosResult as LanczosResult
from hessian_subspace.krylov import Quadrature as Quadrature
from hessian_subspace.krylov import RitzValues as RitzValues
from hessian_subspace.krylov import as_pytrees as as_pytrees
from hessian_subspace.krylov import lanczos as lanczos
from hessian_subspace.krylov import random_start_vector as random_start_vector
from hessian_subspace.krylov import ritz_values as ritz_values
from hessian_subspace.krylov import top_eigenpairs as top_eigenpairs
from hessian_subspace.layout import BatchedData as BatchedData
from hessian_subspace.layout import batch_data as batch_data
from hessian_subspace.metrics import SubspaceErrorBound as SubspaceErrorBound
from hessian_subspace.metrics import UndefinedMetricError as UndefinedMetricError
from hessian_subspace.metrics import eigenvector_overlaps as eigenvector_overlaps
from hessian_subspace.metrics import gradient_fraction as gradient_fraction
from hessian_subspace.metrics import gradient_fraction_bound as gradient_fraction_bound
from hessian_subspace.metrics import hessian_gradient_overlap as hessian_gradient_overlap
from hessian_subspace.metrics import leaf_slices as leaf_slices
from hessian_subspace.metrics import mass_by_leaf as mass_by_leaf
from hessian_subspace.metrics import nested_subspace_overlaps as nested_subspace_overlaps
from hessian_subspace.metrics import principal_angles as principal_angles
from hessian_subspace.metrics import random_vertex_overlap as random_vertex_overlap
from hessian_subspace.metrics import subspace_error_bound as subspace_error_bound
from hessian_subspace.metrics import subspace_overlap as subspace_overlap
from hessian_subspace.metrics import subspace_overlap_bound as subspace_overlap_bound
from hessian_subspace.preconditioned import PreconditionedOperator as PreconditionedOperator
from hessian_subspace.preconditioned import adam_scale as adam_scale
from hessian_subspace.preconditioned import precondition as precondition
from hessian_subspace.spectrum import DiagonalEstimate as DiagonalEstimate
from hessian_subspace.spectrum import SpectralDensity as SpectralDensity
from hessian_subspace.spectrum import TraceEstimate as TraceEstimate
from hessian_subspace.spectrum import hutchinson_diagonal as hutchinson_diagonal
from hessian_subspace.spectrum import hutchinson_trace as hutchinson_trace
from hessian_subspace.spectrum import slq_quadrature as slq_quadrature
from hessian_subspace.spectrum import spectral_density as spectral_density
from hessian_subspace.xtrace import xdiag as xdiag
from hessian_subspace.xtrace import xtrace as xtrace
from hessian_subspace.tracking import track_eigenpairs as track_eigenpairs

__version__ = "0.2.0"
