"""Experiment configs -> library calls: the one place (with :mod:`reproduce`) that reads a
ConfigDict.

A run's config (see ``launch/configs/``) names the data set, label transform, model, optimizer,
batch size, steps, seed and checkpoint schedule; this module unpacks it into explicit keyword
arguments for :mod:`.data`, :mod:`.models` and :mod:`hessian_subspace.training`, and builds the
analysis of a run's checkpoints: the paper's models are users of the pipeline's loss contract
like anyone's (:func:`hessian_subspace.training.tasks.inference_loss`).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from hessian_subspace import analysis, curvature, sharding
from hessian_subspace.analysis import config as analysis_config_lib
from hessian_subspace.paper import data as data_lib
from hessian_subspace.paper import models
from hessian_subspace import checkpoints as ckpt_lib
from hessian_subspace.training import loop as train_lib
from hessian_subspace.training import batches as train_batches
from hessian_subspace.training import tasks

ConfigDict = ml_collections.ConfigDict
placeholder = ml_collections.config_dict.placeholder

# Config fields that do not change the trajectory: a run may be resumed with other values.
_NOT_IDENTITY = ("num_steps", "log_every", "eval_batch_size", "checkpoint_schedule")


def default_config() -> ConfigDict:
    """The paper's default run: FC 784-100-100-10, ReLU, SGD η = 0.1, batch 64, on MNIST."""
    c = ConfigDict()
    c.seed = 0
    c.task = "classification"
    # Fields that default to None are typed placeholders, so that a command line can set them
    # (--config.data.label_transform=shuffle); ml_collections cannot override a plain None.
    c.data = ConfigDict(dict(
        name="mnist",  # tfds name, "idx:DIR", "gaussian_mixture" or "sine"
        data_dir=placeholder(str),  # pre-downloaded tfds data
        kwargs=ConfigDict(),  # e.g. num_classes, dim, num_examples, sigma for gaussian_mixture
        label_transform=placeholder(str),  # None, "shuffle" (random labels) or "even_odd"
        classes=placeholder(tuple),  # keep only these classes (relabelled 0..)
        num_train=placeholder(int),  # a fixed random subset of the training set
        num_test=placeholder(int),  # test-set examples used for the evaluation at checkpoints
        num_analysis=placeholder(int),  # fixed analysis set (None: the whole training set)
        input_shape=placeholder(tuple),  # reshape inputs to (n, *input_shape)
    ))
    c.model = ConfigDict(dict(name="fc", kwargs=ConfigDict(dict(hidden=(100, 100),
                                                                 activation="relu"))))
    c.optimizer = ConfigDict(dict(name="sgd", learning_rate=0.1, momentum=0.9))
    c.batch_size = 64
    c.num_steps = 1000
    c.checkpoint_schedule = "1:100,10:1000,100"
    c.eval_batch_size = 1000
    c.log_every = 50
    return c


def config_to_json(config: ConfigDict | dict) -> dict:
    """A JSON-able plain dict of the config (stored in checkpoints and results)."""
    if isinstance(config, ConfigDict):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=lambda o: list(o) if isinstance(o, tuple)
                                 else str(o)))


def load_data(config: ConfigDict) -> dict[str, Any]:
    """Train, test and analysis sets of a config, with its transforms applied.

    Returns:
      ``{"train", "test", "analysis", "num_outputs", "task"}``; the sets are numpy dicts.
    """
    d = config.data
    kwargs = dict(d.kwargs) if d.kwargs else {}
    train = data_lib.load_dataset(d.name, "train", data_dir=d.data_dir, **kwargs)
    test = data_lib.load_dataset(d.name, "test", data_dir=d.data_dir, **kwargs)
    if d.get("input_shape"):
        shape = tuple(d.input_shape)
        train, test = ({**s, "x": np.reshape(s["x"], (-1, *shape))} for s in (train, test))
    transforms = dict(label_transform=d.label_transform,
                      classes=list(d.classes) if d.classes else None, seed=config.seed)
    train = data_lib.apply_transforms(train, num_examples=d.num_train, **transforms)
    # Random labels stay random in the test set too; the test subset is for evaluation only.
    test = data_lib.apply_transforms(test, num_examples=d.num_test, **transforms)
    analysis = data_lib.analysis_set(train, num_examples=d.num_analysis, seed=config.seed)
    if config.task == "regression":
        num_outputs = int(np.shape(train["y"])[-1])
    elif d.name.startswith("text:"):
        num_outputs = 256  # bytes
    else:
        num_outputs = int(max(np.max(train["y"]), np.max(test["y"]))) + 1
    return dict(train=train, test=test, analysis=analysis, num_outputs=num_outputs,
                task=config.task)


def build_model(config: ConfigDict, num_outputs: int):
    """The flax model a config names."""
    kwargs = dict(config.model.kwargs) if config.model.kwargs else {}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return models.build_model(config.model.name, num_outputs=num_outputs, **kwargs)


SUBSPACE_OPTIMIZERS = ("dom_sgd", "bulk_sgd", "low_rank_newton")


def build_optimizer(config: ConfigDict, model=None, num_outputs: int | None = None):
    """The optax transformation a config names: "sgd", "momentum", "adam", or one acting on the
    top Hessian subspace (:mod:`optim`): "dom_sgd", "bulk_sgd" (SGD projected onto the top-k
    subspace or its complement) and "low_rank_newton" (eq. 11); these need ``model`` and read
    ``optimizer.k`` (default: number of classes), ``refresh_every``, ``damping``, ``step_size``,
    ``curvature_batch_size``; and "galore" (:mod:`hessian_subspace.training.galore`: Adam in
    the rank-``optimizer.rank`` gradient subspace of each matrix, refreshed every
    ``refresh_every`` updates, ``scale``)."""
    o = config.optimizer
    if o.name in SUBSPACE_OPTIMIZERS:
        import optax

        from hessian_subspace.training import optim

        if model is None:
            raise ValueError(f"optimizer {o.name!r} needs the model (Hessian access)")
        loss = curvature.bind_state(tasks.inference_loss(model, config.task), {})
        batch_size = int(o.get("curvature_batch_size", 1000))

        def hessian_fn(params, data):
            return curvature.dataset_hvp(loss, params, data, batch_size=batch_size)

        k = int(o.get("k") or num_outputs)
        key = jax.random.fold_in(jax.random.key(config.seed), 0x0B7)
        refresh = int(o.get("refresh_every", 10))
        if o.name == "low_rank_newton":
            return optim.low_rank_newton(k, float(o.get("damping", 1.0)), hessian_fn=hessian_fn,
                                         key=key, refresh_every=refresh,
                                         step_size=float(o.get("step_size", 1.0)))
        mode = "dominant" if o.name == "dom_sgd" else "bulk"
        return optax.chain(optax.sgd(o.learning_rate),
                           optim.project_onto_subspace(mode, k, refresh, hessian_fn=hessian_fn,
                                                       key=key))
    if o.name == "galore":
        from hessian_subspace.training import galore

        return galore.galore(o.learning_rate, int(o.get("rank", 4)),
                             refresh_every=int(o.get("refresh_every", 200)),
                             scale=float(o.get("scale", 0.25)),
                             **{k: o[k] for k in ("b1", "b2", "eps") if k in o})
    extra = {k: o[k] for k in ("momentum", "b1", "b2", "eps") if k in o}
    if o.name != "momentum":
        extra.pop("momentum", None)
    return train_lib.make_optimizer(o.name, o.learning_rate, **extra)



def train_from_config(config: ConfigDict, workdir: str, *,
                      callbacks: Sequence[Callable] = (), progress: bool = True, mesh=None):
    """Loads the data, builds model and optimizer, and trains with checkpoints in ``workdir``.

    Resumes automatically from the last finalised checkpoint of the same config.
    """
    data = load_data(config)
    model = build_model(config, data["num_outputs"])
    identity = {k: v for k, v in config_to_json(config).items() if k not in _NOT_IDENTITY}
    meta = dict(config=config_to_json(config), identity=identity,
                num_outputs=data["num_outputs"])
    curvature_data = None
    if config.optimizer.name in SUBSPACE_OPTIMIZERS:
        n = config.optimizer.get("curvature_examples", 2000)
        subset = data_lib.analysis_set(data["train"], num_examples=min(
            n, len(data["train"]["y"])), seed=config.seed)
        curvature_data = {"x": jnp.asarray(subset["x"]), "y": jnp.asarray(subset["y"])}
    return train_lib.train(
        model=model, task=data["task"], train_set=data["train"], test_set=data["test"],
        optimizer=build_optimizer(config, model, data["num_outputs"]),
        curvature_data=curvature_data, batch_size=config.batch_size,
        num_steps=config.num_steps, seed=config.seed, workdir=workdir,
        schedule=train_lib.CheckpointSchedule(config.checkpoint_schedule), meta=meta,
        eval_batch_size=config.eval_batch_size, log_every=config.log_every,
        callbacks=callbacks, progress=progress, mesh=mesh)


def read_run_config(workdir: str, *, wait_seconds: float = 0.0, poll_seconds: float = 1.0
                    ) -> tuple[dict, int]:
    """The config and number of outputs of a training run, from its first finalised checkpoint.

    With ``wait_seconds`` > 0, waits that long for a first checkpoint (a run just started).
    """
    ckpt_dir = os.path.join(workdir, train_lib.CHECKPOINT_DIR)
    deadline = time.monotonic() + wait_seconds
    while True:
        steps = ckpt_lib.list_steps(ckpt_dir)
        errors = []
        for step in steps:  # every checkpoint carries the config: the first readable one
            try:
                meta = ckpt_lib.read_meta(ckpt_dir, step)
            except ckpt_lib.CheckpointError as e:
                logging.warning("%s; reading the run's config from the next checkpoint", e)
                errors.append(str(e))
                continue
            if "config" not in meta:
                raise ValueError(f"checkpoints in {ckpt_dir} carry no run config")
            return meta["config"], int(meta["num_outputs"])
        if errors:
            raise ckpt_lib.CheckpointError(
                f"no checkpoint in {ckpt_dir} has a readable meta item (the run's config): "
                f"{errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        if time.monotonic() >= deadline:
            raise FileNotFoundError(f"no finalised checkpoint in {ckpt_dir}"
                                    + ("" if os.path.isdir(ckpt_dir) else
                                       " (the directory does not exist)"))
        time.sleep(poll_seconds)


def analyzer_for(config: ConfigDict, num_outputs: int, analysis_set: dict, results_dir: str, *,
                 analysis_config: ConfigDict | None = None, test_set: dict | None = None,
                 record_fields: dict | None = None, progress: bool = True, mesh=None,
                 overwrite: bool = False, retry_failed: bool = True,
                 model=None) -> analysis.Analyzer:
    """The analyzer of a run of the paper's models: :func:`analysis.config.build_chain` of
    ``analysis_config`` (default :func:`analysis.config.default_config`) on the
    inference-mode loss, metrics and outputs of the config's model (``model``: that model,
    already built). ``record_fields`` (default: ``k`` and the config) go into every record. On
    a ``mesh``, examples are split over its ``data`` axis and parameters FSDP-style over its
    ``model`` axis (:func:`hessian_subspace.sharding.fsdp_shardings`). ``overwrite``: records
    of other inputs in ``results_dir`` are computed again (moved aside) instead of refused."""
    acfg = with_run_settings(analysis_config_lib.as_config(
        analysis_config or analysis_config_lib.default_config()), config)
    model = build_model(config, num_outputs) if model is None else model
    k = acfg.k or num_outputs
    blocks = (models.gpt_blocks(model.depth) if isinstance(model, models.GPT) else None)
    chain = analysis_config_lib.build_chain(
        acfg, k=k, metrics_fn=tasks.inference_metrics(model, config.task), blocks=blocks,
        optimizer=step_optimizer(config, acfg))
    xy = lambda ds: None if ds is None else {"x": ds["x"], "y": ds["y"]}  # noqa: E731
    return analysis.Analyzer(
        chain, tasks.inference_loss(model, config.task), data=xy(analysis_set),
        test_data=xy(test_set),
        results=analysis.Results(
            results_dir, overwrite=overwrite, retry_failed=retry_failed, progress=progress,
            record_fields=dict(k=k, config=config_to_json(config)) if record_fields is None
            else record_fields),
        **analysis_config_lib.analyzer_options(
            acfg, output_fn=tasks.inference_outputs(model),
            output_loss=tasks.output_loss(config.task), mesh=mesh,
            param_sharding=None if mesh is None else functools.partial(
                sharding.fsdp_shardings, mesh=mesh)))


def with_run_settings(acfg: ConfigDict, config: ConfigDict) -> ConfigDict:
    """``acfg`` with what the run decides filled in: ``loss_decrease.learning_rate`` (None:
    the run's η)."""
    if ("loss_decrease" in analysis_config_lib.names(acfg)
            and acfg.loss_decrease.learning_rate is None
            and config.optimizer.get("learning_rate")):
        acfg = ConfigDict(acfg.to_dict())
        acfg.loss_decrease.learning_rate = float(config.optimizer.learning_rate)
    return acfg


def step_optimizer(config: ConfigDict, acfg: ConfigDict):
    """The run's optimizer, for ``loss_decrease`` to take its own step (None when the analysis
    does not ask for it, or for the subspace optimizers, whose step needs the Hessian)."""
    if ("loss_decrease" not in analysis_config_lib.names(acfg)
            or not acfg.loss_decrease.use_optimizer):
        return None
    if config.optimizer.name in SUBSPACE_OPTIMIZERS:
        logging.warning("loss_decrease: the step of %r is not taken (it needs the Hessian); "
                        "only -η g is measured", config.optimizer.name)
        return None
    return build_optimizer(config)


def next_batches(config: ConfigDict, train_set: dict) -> Callable[[int], dict]:
    """``step -> {"next_batch": ...}``: the mini-batch the run trains on after the checkpoint
    at ``step`` (its order is a function of the step and seed,
    :func:`hessian_subspace.training.batches.batch_indices`)."""
    n, batch_size, seed = len(train_set["y"]), int(config.batch_size), int(config.seed)

    def next_batch(step: int) -> dict:
        idx = train_batches.batch_indices(n, batch_size, step, seed)
        return {"next_batch": {"x": train_set["x"][idx], "y": train_set["y"][idx]}}

    return next_batch


def restore_like(model, example_x, mesh=None) -> tuple[Any, Any]:
    """``(params, model_state)`` as ``ShapeDtypeStruct``s: the restore target of a run's
    checkpoints; on a mesh with the FSDP shardings of :func:`analyzer_for` (state replicated),
    so that every process restores only its shards."""
    like, state_like = jax.eval_shape(lambda: tasks.init_variables(
        model, jax.random.key(0), np.asarray(example_x)))
    if mesh is None:
        return like, state_like
    place = lambda tree, shardings: jax.tree_util.tree_map(  # noqa: E731
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)
    return (place(like, sharding.fsdp_shardings(like, mesh)),
            place(state_like, jax.tree_util.tree_map(lambda _: sharding.replicated(mesh),
                                                     state_like)))


def analyze_run(workdir: str, results_dir: str, *, analysis_config: ConfigDict | None = None,
                steps=None, watch: bool = False, poll_seconds: float = 2.0,
                timeout_seconds: float = 600.0, num_analysis: int | None = None,
                test_metrics: bool = False, retry_failed: bool = True,
                progress: bool = True, mesh=None, overwrite: bool = False,
                allow_failures: bool = False) -> list[dict]:
    """Streams a run's checkpoints (finished, or live with ``watch``) through the pipeline.

    The model and the analysis set are rebuilt from the config stored in the checkpoints;
    ``analysis_config`` (default :func:`analysis.config.default_config`) says what is measured.
    ``num_analysis`` overrides the size of the analysis set (a fixed random subset).
    ``overwrite`` and ``allow_failures`` are those of :class:`analysis.Analyzer` and
    :meth:`analysis.Analyzer.run`: by default records of other inputs are refused and failed
    checkpoints end the run with :class:`analysis.FailedStepsError`.
    """
    config_json, num_outputs = read_run_config(workdir, wait_seconds=timeout_seconds if watch
                                               else 0.0)
    config = ConfigDict(config_json)
    if num_analysis is not None:
        config.data.num_analysis = int(num_analysis)
    data = load_data(config)
    model = build_model(config, num_outputs)
    like, state_like = restore_like(model, data["analysis"]["x"][:1], mesh)
    acfg = analysis_config_lib.validate(with_run_settings(analysis_config_lib.as_config(
        analysis_config or analysis_config_lib.default_config()), config))
    todo = analysis_config_lib.names(acfg)
    num_params = models.param_count(like)
    k = acfg.k or num_outputs
    pairs = analysis_config_lib.num_pairs(acfg, k)
    if ("eigenpairs" in todo and analysis_config_lib.block_of(acfg) is None
            and pairs > num_params - 1):
        bound = int(acfg.eigenpairs.next_bound)
        raise ValueError(f"`k` = {k}: the analysis computes {pairs} eigenpairs "
                         f"(2k{' + 1' if bound else ''}) but the model has "
                         f"{num_params} parameters; k must be <= "
                         f"{(num_params - 1 - bound) // 2}")
    analyzer = analyzer_for(config, num_outputs, data["analysis"], results_dir,
                            analysis_config=acfg,
                            test_set=data["test"] if test_metrics else None,
                            record_fields=dict(k=k, config=config_json),
                            progress=progress, mesh=mesh, overwrite=overwrite,
                            retry_failed=retry_failed, model=model)
    optimizer = step_optimizer(config, acfg)
    source = ckpt_lib.run_checkpoints(
        os.path.join(workdir, train_lib.CHECKPOINT_DIR), like=like, state_like=state_like,
        final_step=config.get("num_steps"),
        optimizer=bool(analysis_config_lib.NEEDS_OPTIMIZER.intersection(todo))
        or (optimizer is not None and bool(jax.tree_util.tree_leaves(
            jax.eval_shape(optimizer.init, like)))))
    if "loss_decrease" in todo:
        source = analysis.sources.with_extras(source, next_batches(config, data["train"]))
    return analyzer.run(source, steps=steps, watch=watch, poll_seconds=poll_seconds,
                        timeout_seconds=timeout_seconds, allow_failures=allow_failures)
