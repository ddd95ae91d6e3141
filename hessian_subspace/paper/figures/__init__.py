"""Figures of Gur-Ari, Roberts & Dyer (2018), "Gradient Descent Happens in a Tiny Subspace".

Every function takes plain Python/numpy results (the records of
:func:`hessian_subspace.analysis.read_results`, the arrays of
:meth:`hessian_subspace.analysis.ResultStore.stored`, the log of
:func:`hessian_subspace.training.read_train_log`) and returns a :class:`matplotlib.figure.Figure`.
One module per family of figures: :mod:`.curves` (Figs. 1, 12, training curves),
:mod:`.subspaces` (Figs. 2, 3, 11), :mod:`.spectra` (Figs. 4, 5, 8), :mod:`.eigenvectors`
(Figs. 6-7), :mod:`.tables` (Table 1, the toy model). No JAX computation happens here beyond
smoothing a density, and no global pyplot state is touched: figures are built with
``matplotlib.figure.Figure`` directly, so they render headless (Agg) and need no ``plt.close``.

Records are skipped unless ``status == "ok"`` (a record without ``status`` counts as ok), and
``None`` or non-finite values are skipped point by point, so a failed checkpoint leaves a gap
instead of an exception. A function raises ``ValueError`` only when nothing at all can be drawn.

Figure numbers follow the paper (arXiv 1812.04754): Fig. 1 (f_top with loss/accuracy), Fig. 2
(subspace overlap against t2 − t1), Fig. 3/9/10 (overlap against subspace dimension), Fig. 4
(dense spectrum), Fig. 5 (SLQ density), Fig. 6-7 (top eigenvector by layer), Fig. 8 (λ_max),
Fig. 11 (c_i²), Fig. 12 (f_top of variants), Table 1 (overlap(g, Hg)).

Example:
    >>> recs = [dict(status="ok", step=s, k=2, f_top=0.1 * s) for s in range(5)]
    >>> fig = fig1_ftop(recs)
    >>> len(fig.axes)
    1

References:
    Gur-Ari, Roberts, Dyer. Gradient Descent Happens in a Tiny Subspace. arXiv:1812.04754, 2018.
    Ghorbani, Krishnan, Xiao. An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density. ICML 2019 (SLQ densities).
"""

from hessian_subspace.paper.figures import directions as directions
from hessian_subspace.paper.figures import sharpness as sharpness
from hessian_subspace.paper.figures import structure as structure
from hessian_subspace.paper.figures import transformer as transformer
from hessian_subspace.paper.figures._common import save as save
from hessian_subspace.paper.figures.curves import fig1_ftop as fig1_ftop
from hessian_subspace.paper.figures.curves import fig12_variants as fig12_variants
from hessian_subspace.paper.figures.curves import training_curves as training_curves
from hessian_subspace.paper.figures.eigenvectors import (
    fig6_eigenvector_anatomy as fig6_eigenvector_anatomy)
from hessian_subspace.paper.figures.spectra import eigenvalues_over_time as eigenvalues_over_time
from hessian_subspace.paper.figures.spectra import fig4_dense_spectrum as fig4_dense_spectrum
from hessian_subspace.paper.figures.spectra import fig5_slq_density as fig5_slq_density
from hessian_subspace.paper.figures.spectra import fig8_lambda_max as fig8_lambda_max
from hessian_subspace.paper.figures.subspaces import (
    fig11_eigenvector_overlaps as fig11_eigenvector_overlaps)
from hessian_subspace.paper.figures.subspaces import fig2_subspace_overlap as fig2_subspace_overlap
from hessian_subspace.paper.figures.subspaces import fig3_overlap_vs_dim as fig3_overlap_vs_dim
from hessian_subspace.paper.figures.subspaces import seed_curve as seed_curve
from hessian_subspace.paper.figures.tables import table1_markdown as table1_markdown
from hessian_subspace.paper.figures.tables import toy_model_figure as toy_model_figure
