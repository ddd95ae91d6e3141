"""The paper's analysis as config-as-code: one ``ml_collections`` config, one chain builder.

:func:`default_config` is a nested :class:`ml_collections.ConfigDict` whose sections are the
built-in transforms and whose fields are their factories' arguments (``eigenpairs.tol`` is
:func:`~hessian_subspace.analysis.eigenpairs`'s ``tol``), plus ``operator`` (the
:class:`~hessian_subspace.analysis.Analyzer`'s options). :func:`build_chain` turns a config
into a :func:`~hessian_subspace.analysis.chain`, :func:`analyzer_options` into the analyzer's
keyword arguments. ``launch/configs/analysis.py`` is this config for the command line
(overrides such as ``--config.k=20 --config.eigenpairs.tol=1e-4``), and the paper's
experiment configs embed it as their ``analysis`` block. ``k`` is top-level because five
transforms share it (``eigenpairs`` computes 2k pairs, ``f_top``, ``c2``, ``ggn`` and
``subspace_overlap`` use k).

The flat names of earlier versions (``--tol``, ``--lanczos_steps``, ``--reference_steps`` ...)
are aliases onto the config's fields (:data:`ALIASES`, :func:`apply_aliases`).

Example:
  >>> from hessian_subspace.analysis import config as config_lib
  >>> c = config_lib.default_config()
  >>> c.eigenpairs.tol, c.transforms.split(",")[:3]
  (0.001, ['loss', 'gradient', 'eigenpairs'])
  >>> c = config_lib.apply_aliases(c, tol=1e-4, reference_steps=(0, 100))
  >>> c.eigenpairs.tol, c.ggn.tol, c.subspace_overlap.reference_steps
  (0.0001, 0.0001, (0, 100))
  >>> config_lib.build_chain(c, k=3).names  # doctest: +NORMALIZE_WHITESPACE
  ('loss', 'gradient', 'eigenpairs', 'f_top', 'c2', 'overlap_g_hg', 'layers',
   'subspace_overlap')
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

from hessian_subspace.analysis import builtins as b
from hessian_subspace.analysis import classes, directions, galore, specs, spectra, views
from hessian_subspace.analysis.transforms import Chain, Transform, at_steps, chain

ConfigDict = ml_collections.ConfigDict

TRANSFORMS = (
    "loss",  # full-data loss and accuracy (train; test too if a test set is given)
    "gradient",  # full-data gradient g, its norm
    "eigenpairs",  # top-2k eigenpairs (top k and "next k"), residuals, converged
    "f_top",  # f_top, f_next of the full gradient; f_top of fixed mini-batch gradients
    "overlap_g_hg",  # g^T H g / (|g| |Hg|)  (Table 1)
    "c2",  # c_i^2, i = 1..2k (Fig. 11)
    "layers",  # lambda_max and the top eigenvector's mass per layer (Fig. 6-8)
    "subspace_overlap",  # eq. 5 against reference steps and the previous step, d = 1..2k
    "slq",  # spectral density by SLQ (Fig. 5), at `slq.steps` (deflated: `slq.deflate`)
    "dense_spectrum",  # all eigenvalues, small models only (Fig. 4), at `dense_spectrum.steps`
    "f_top_curve",  # f_top for every k up to 2k, at `f_top_curve.ks`, and where it saturates
    "block_spectra",  # top eigenvalues and SLQ density of each parameter block
    "adam",  # the Hessian through Adam's preconditioner (optimizer state from the checkpoint)
    "ggn",  # beside the Hessian: the Gauss-Newton top-k and f_top in its subspace
    "loss_decrease",  # ΔL of the optimizer's step and of its top-k and bulk parts
    "loss_landscape",  # loss slices along top, bulk, random and gradient directions
    "class_mean_subspace",  # Papyan's class/cross-class means and class-mean gradients
    "galore_subspace",  # GaLore's rank-r gradient projectors against the Hessian's blocks
    "trace",  # Tr H (Hutchinson, deflated by the eigenpairs) and the diagonal, at `trace.steps`
)
DEFAULT_TRANSFORMS = TRANSFORMS[:8]
# Transforms that read the optimizer state from the checkpoint.
NEEDS_OPTIMIZER = frozenset({"adam"})


def default_config() -> ConfigDict:
    """The paper's analysis (see the module docstring); every field is documented here."""
    c = ConfigDict()
    # Comma-separated names from TRANSFORMS; the chain runs them in build_chain's fixed order
    # (the paper's: loss, gradient, eigenpairs, f_top, c2, ggn, overlap_g_hg, layers, ...).
    c.transforms = ",".join(DEFAULT_TRANSFORMS)
    c.k = placeholder(int)  # top-k size; None: the number of classes (model outputs)
    c.operator = ConfigDict(dict(
        curvature="hessian",  # "hessian" or "ggn": the operator of every curvature transform
        block=placeholder(str),  # only these parameter leaves: comma-separated path prefixes
        dtype="float32",  # "float32" or "float64" (scoped enable_x64)
        precision=placeholder(str),  # HVP matmul precision (None: JAX's default)
        batch_size=1000,  # examples per HVP / gradient batch
        hvp_cache="auto",  # "auto", "true", "false": linearise the product once per solve
        seed=0,  # PRNG seed of start vectors, probes and mini-batches
    ))
    c.eigenpairs = ConfigDict(dict(
        tol=1e-3,  # relative residual of the eigenpairs
        num_steps=placeholder(int),  # Krylov cap for the 2k pairs (None: library default)
        block_size=1,  # Lanczos block size (> 1 resolves repeated eigenvalues)
        warm_start=True,  # start from the previous checkpoint's subspace
        # Warm start by block Krylov from the previous basis (hs.track_eigenpairs), at most
        # tracker_blocks blocks; off by default (BUILD_NOTES, issue 6).
        tracker=False,
        tracker_blocks=4,
        next_bound=False,  # one more Ritz pair (2k + 1): error bars on next-k quantities
        memory_budget=placeholder(float),  # bytes per device for the Krylov basis (restart)
    ))
    c.f_top = ConfigDict(dict(num_minibatches=4, minibatch_size=64))
    c.ggn = ConfigDict(dict(tol=1e-3, num_steps=placeholder(int), block_size=1))
    c.subspace_overlap = ConfigDict(dict(
        reference_steps=(0, 10, 50, 100, 200, 500, 1000), previous=True))
    # `steps`: the checkpoints it runs at; () : every checkpoint.
    c.slq = ConfigDict(dict(steps=(), num_probes=10, num_steps=80,
                            deflate=False))  # the converged eigenpairs placed exactly
    c.trace = ConfigDict(dict(steps=(), num_probes=50,
                              deflate=True,  # the eigenpairs' part exactly, probes the rest
                              diagonal=False,  # also diag H with standard errors (spectra/)
                              estimator="hutchinson"))  # or "xtrace" (even num_probes)
    c.dense_spectrum = ConfigDict(dict(steps=(), max_params=5000))
    c.f_top_curve = ConfigDict(dict(ks=()))  # () : k and 2k
    c.block_spectra = ConfigDict(dict(steps=(), k=4, tol=1e-3, slq_probes=4, slq_steps=30))
    c.adam = ConfigDict(dict(k=10, b2=0.999, eps=1e-8, tol=1e-3))
    c.loss_decrease = ConfigDict(dict(
        steps=(),
        learning_rate=placeholder(float),  # η of the step -η g (the paper's runs: their own)
        use_optimizer=True,  # also the run's optimizer's own step (build_chain's `optimizer`)
    ))
    c.loss_landscape = ConfigDict(dict(
        steps=(), num_top=2, num_bulk=2, num_random=2, gradient=True, radius=1.0,
        num_points=21, surface_points=11,
        surfaces="top1:top2,top1:random1",  # pairs of direction names ("" : none)
        normalization="unit",  # "unit" or "filter" (Li et al. 2018)
    ))
    c.class_mean_subspace = ConfigDict(dict(steps=(), ggn=True, tol=1e-3))
    c.galore_subspace = ConfigDict(dict(
        steps=(), rank=4, refresh_every=200, tol=1e-3,
        leaves="",  # comma-separated path prefixes of the matrices ("" : every 2-D leaf)
    ))
    return c


# Flat names of earlier versions (command-line flags, experiment configs) -> config fields.
ALIASES: dict[str, tuple[str, ...]] = {
    "transforms": ("transforms",), "k": ("k",),
    "curvature": ("operator.curvature",), "block": ("operator.block",),
    "dtype": ("operator.dtype",), "precision": ("operator.precision",),
    "batch_size": ("operator.batch_size",), "hvp_cache": ("operator.hvp_cache",),
    "memory_budget": ("eigenpairs.memory_budget",), "seed": ("operator.seed",),
    "tol": ("eigenpairs.tol", "ggn.tol", "block_spectra.tol", "adam.tol"),
    "lanczos_steps": ("eigenpairs.num_steps", "ggn.num_steps"),
    "block_size": ("eigenpairs.block_size", "ggn.block_size"),
    "warm_start": ("eigenpairs.warm_start",), "tracker": ("eigenpairs.tracker",),
    "tracker_blocks": ("eigenpairs.tracker_blocks",), "next_bound": ("eigenpairs.next_bound",),
    "num_minibatches": ("f_top.num_minibatches",), "minibatch_size": ("f_top.minibatch_size",),
    "reference_steps": ("subspace_overlap.reference_steps",),
    "slq_steps": ("slq.steps",), "slq_probes": ("slq.num_probes",),
    "slq_lanczos_steps": ("slq.num_steps",),
    "dense_steps": ("dense_spectrum.steps",), "dense_max_params": ("dense_spectrum.max_params",),
    "f_top_ks": ("f_top_curve.ks",),
    "block_spectra_steps": ("block_spectra.steps",), "block_k": ("block_spectra.k",),
    "block_slq_probes": ("block_spectra.slq_probes",),
    "block_slq_steps": ("block_spectra.slq_steps",),
    "adam_k": ("adam.k",), "adam_b2": ("adam.b2",), "adam_eps": ("adam.eps",),
    "also_ggn": (),  # True: "ggn" added to `transforms`
}


def apply_aliases(config: ConfigDict, **flat: Any) -> ConfigDict:
    """A copy of ``config`` with flat (alias) names set on the fields they stand for
    (:data:`ALIASES`); an unknown name is a ``ValueError``."""
    config = copy.deepcopy(config)
    unknown = sorted(set(flat) - set(ALIASES))
    if unknown:
        raise ValueError(f"unknown analysis settings {unknown}; the flat names are "
                         f"{sorted(ALIASES)} (or set the config's fields: --config.SECTION.FIELD)")
    # also_ggn last: it adds to whatever `transforms` says.
    for name, value in sorted(flat.items(), key=lambda item: item[0] == "also_ggn"):
        if name == "also_ggn":
            if value and "ggn" not in names(config):
                config.transforms = ",".join([*names(config), "ggn"])
            continue
        if name == "transforms" and not isinstance(value, str):
            value = ",".join(value)
        elif name == "block" and value is not None and not isinstance(value, str):
            value = ",".join(value)
        elif name == "hvp_cache" and isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):
            value = tuple(value)
        for path in ALIASES[name]:
            *parents, field = path.split(".")
            node = config
            for p in parents:
                node = node[p]
            node[field] = value
    return config


def names(config: ConfigDict) -> list[str]:
    """The transform names of ``config.transforms``, checked against :data:`TRANSFORMS`."""
    value = config.transforms
    if not isinstance(value, str):
        raise ValueError(f"`config.transforms` must be a comma-separated string, got {value!r}")
    todo = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in todo if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"`config.transforms`: unknown transforms {unknown}; choose from "
                         f"{list(TRANSFORMS)}")
    return todo


def block_of(config: ConfigDict) -> tuple[str, ...] | None:
    """``config.operator.block`` as the analyzer's ``block`` (None: all parameters)."""
    block = config.operator.block
    return None if not block else tuple(p.strip() for p in block.split(",") if p.strip())


def hvp_cache_of(config: ConfigDict) -> bool | str:
    value = config.operator.hvp_cache
    choices = {"auto": "auto", "true": True, "false": False, True: True, False: False}
    if value not in choices:
        raise ValueError(f"`config.operator.hvp_cache` must be 'auto', 'true' or 'false', got "
                         f"{value!r}")
    return choices[value]


def analyzer_options(config: ConfigDict, *, output_fn: Callable | None = None,
                     output_loss: Callable | None = None, mesh=None,
                     param_sharding: Callable | None = None) -> dict:
    """The :class:`~hessian_subspace.analysis.Analyzer` keyword arguments of
    ``config.operator`` (``batch_size``, ``seed``, ``operator``, ``placement``), with the
    model's Gauss-Newton split and the device mesh given here."""
    o = config.operator
    return dict(
        batch_size=o.batch_size, seed=o.seed,
        operator=specs.Operator(curvature=o.curvature, output_fn=output_fn,
                                output_loss=output_loss, block=block_of(config), dtype=o.dtype,
                                precision=o.precision, hvp_cache=hvp_cache_of(config)),
        placement=specs.Placement(mesh=mesh, param_sharding=param_sharding))


def num_pairs(config: ConfigDict, k: int) -> int:
    """Eigenpairs the ``eigenpairs`` transform computes for top-``k``: 2k (2k + 1 with
    ``eigenpairs.next_bound``)."""
    return 2 * k + int(config.eigenpairs.next_bound)


def build_chain(config: ConfigDict | Mapping, *, k: int, metrics_fn: Callable | None = None,
                blocks: dict | None = None, optimizer: Any = None) -> Chain:
    """The chain of the paper's measurements that ``config.transforms`` names, in a fixed order
    (that of :data:`TRANSFORMS`, except ``c2`` and ``ggn`` right after ``f_top``). Every
    factory's error names its config section (``config.eigenpairs: `tol` must be > 0 ...``).

    Args:
      config: :func:`default_config`, as given or updated (a plain nested dict is merged
        over the defaults).
      k: size of the top subspace (``config.k`` or the number of classes).
      metrics_fn: for "loss": ``metrics(params, batch[, state])`` with loss and accuracy.
      blocks: for "block_spectra": ``{name: leaf prefix}`` (None: top-level keys).
      optimizer: for "loss_decrease" (with ``loss_decrease.use_optimizer``): the run's optax
        optimizer, whose own step is measured beside -η g.
    """
    c = as_config(config)
    todo = set(names(c))
    if "ggn" in todo and (c.operator.curvature != "hessian" or "eigenpairs" not in todo):
        raise ValueError("`config.transforms`: 'ggn' (beside the Hessian) needs "
                         "config.operator.curvature='hessian' and 'eigenpairs'")
    if c.operator.curvature not in ("hessian", "ggn"):
        raise ValueError(f"`config.operator.curvature` must be 'hessian' or 'ggn', got "
                         f"{c.operator.curvature!r}")
    if c.operator.dtype not in ("float32", "float64"):
        raise ValueError(f"`config.operator.dtype` must be 'float32' or 'float64', got "
                         f"{c.operator.dtype!r}")
    hvp_cache_of(c)
    e = c.eigenpairs
    makers: list[tuple[str, Callable[[], Transform]]] = [
        ("loss", lambda: b.loss(metrics_fn)),
        ("gradient", b.gradient),
        ("eigenpairs", lambda: b.eigenpairs(
            num_pairs(c, k), tol=e.tol, num_steps=e.num_steps, block_size=e.block_size,
            warm_start=e.warm_start, tracker=e.tracker, tracker_blocks=e.tracker_blocks,
            memory_budget=e.memory_budget)),
        ("f_top", lambda: b.f_top(k, num_minibatches=c.f_top.num_minibatches,
                                  minibatch_size=c.f_top.minibatch_size)),
        ("c2", lambda: b.c2(2 * k)),
        ("ggn", lambda: b.ggn(k, tol=c.ggn.tol, num_steps=c.ggn.num_steps,
                              block_size=c.ggn.block_size)),
        ("overlap_g_hg", b.overlap_g_hg),
        ("layers", b.layers),
        # Fig. 3: the overlap as a function of the dimension d = 1 ... 2k.
        ("subspace_overlap", lambda: b.subspace_overlap(
            k, reference_steps=tuple(c.subspace_overlap.reference_steps),
            previous=c.subspace_overlap.previous, dims=range(1, 2 * k + 1))),
        ("slq", lambda: _at(spectra.slq(num_probes=c.slq.num_probes, num_steps=c.slq.num_steps,
                                        deflate=c.slq.deflate), c.slq.steps)),
        ("trace", lambda: _at(spectra.trace(num_probes=c.trace.num_probes,
                                            deflate=c.trace.deflate,
                                            diagonal=c.trace.diagonal,
                                            estimator=c.trace.estimator), c.trace.steps)),
        ("dense_spectrum", lambda: _at(spectra.dense_spectrum(
            max_params=c.dense_spectrum.max_params), c.dense_spectrum.steps)),
        ("f_top_curve", lambda: views.f_top_curve(tuple(c.f_top_curve.ks) or (k, 2 * k))),
        ("block_spectra", lambda: _at(views.block_spectra(
            blocks, k=c.block_spectra.k, tol=c.block_spectra.tol,
            slq_probes=c.block_spectra.slq_probes, slq_steps=c.block_spectra.slq_steps),
            c.block_spectra.steps)),
        ("adam", lambda: views.adam_preconditioned(c.adam.k, b2=c.adam.b2, eps=c.adam.eps,
                                                   tol=c.adam.tol)),
        ("loss_decrease", lambda: _at(directions.loss_decrease(
            k, learning_rate=c.loss_decrease.learning_rate,
            optimizer=optimizer if c.loss_decrease.use_optimizer else None),
            c.loss_decrease.steps)),
        ("loss_landscape", lambda: _at(directions.loss_landscape(
            k, num_top=c.loss_landscape.num_top, num_bulk=c.loss_landscape.num_bulk,
            num_random=c.loss_landscape.num_random, gradient=c.loss_landscape.gradient,
            radius=c.loss_landscape.radius, num_points=c.loss_landscape.num_points,
            surface_points=c.loss_landscape.surface_points,
            surfaces=surface_pairs(c.loss_landscape.surfaces),
            normalization=c.loss_landscape.normalization), c.loss_landscape.steps)),
        ("class_mean_subspace", lambda: _at(classes.class_mean_subspace(
            k, ggn=c.class_mean_subspace.ggn, tol=c.class_mean_subspace.tol),
            c.class_mean_subspace.steps)),
        ("galore_subspace", lambda: _at(galore.galore_subspace(
            c.galore_subspace.rank, refresh_every=c.galore_subspace.refresh_every,
            tol=c.galore_subspace.tol,
            leaves=[x.strip() for x in c.galore_subspace.leaves.split(",") if x.strip()]
            or None), c.galore_subspace.steps)),
    ]
    parts = []
    for name, make in makers:
        if name in todo:
            try:
                parts.append(make())
            except (TypeError, ValueError) as err:
                section = name if name in c else "operator"
                raise type(err)(f"config.{section}: {err}") from None
    return chain(*parts)


def surface_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """``"top1:top2,top1:random1"`` as ``(("top1", "top2"), ("top1", "random1"))``."""
    if not isinstance(text, str):
        raise ValueError(f"`surfaces` must be a string like 'top1:top2,top1:random1', got "
                         f"{text!r}")
    pairs = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        pair = tuple(x.strip() for x in item.split(":"))
        if len(pair) != 2:
            raise ValueError(f"`surfaces`: {item!r} is not two names joined by ':'")
        pairs.append(pair)
    return tuple(pairs)


def _at(t: Transform, steps) -> Transform:
    """``t`` at ``steps`` (empty: at every checkpoint)."""
    steps = tuple(steps or ())
    return t if not steps else at_steps(t, steps)


def as_config(config: ConfigDict | Mapping) -> ConfigDict:
    """``config`` as a :class:`ConfigDict` of :func:`default_config`'s fields: a plain nested
    dict is merged over the defaults; a field the defaults lack is a ``ValueError``."""
    if isinstance(config, ConfigDict):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"`config` must be an ml_collections.ConfigDict or a dict, got "
                        f"{type(config).__name__}")
    out = default_config()
    _merge(out, config, "config")
    return out


def _merge(node: ConfigDict, fields: Mapping, where: str) -> None:
    for key, value in fields.items():
        if key not in node:
            raise ValueError(f"`{where}` has no field {key!r}; its fields are {sorted(node)}")
        if isinstance(node[key], ConfigDict):
            if not isinstance(value, Mapping):
                raise ValueError(f"`{where}.{key}` is a section; give a dict, got {value!r}")
            _merge(node[key], value, f"{where}.{key}")
        else:
            node[key] = tuple(value) if isinstance(value, list) else value


def to_json(config: ConfigDict) -> dict:
    """The config's fields as JSON (what names an analysis, and what records carry)."""
    return json.loads(json.dumps(as_config(config).to_dict()))


def validate(config: ConfigDict, *, k: int | None = None) -> ConfigDict:
    """``config`` if :func:`build_chain` accepts it (with ``k``, or the smallest k the
    ``f_top_curve.ks`` allow when ``config.k`` is None); otherwise a ``ValueError`` or
    ``TypeError`` naming the field, before anything runs."""
    c = as_config(config)
    if c.k is not None and (isinstance(c.k, bool) or not isinstance(c.k, int) or c.k < 1):
        raise ValueError(f"`config.k` must be an int >= 1 or None, got {c.k!r}")
    ks = tuple(c.f_top_curve.ks)
    build_chain(c, k=k or c.k or max([2, *((x + 1) // 2 for x in ks)]))
    return c
