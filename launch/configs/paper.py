r"""Every experiment of the paper, by name (Gur-Ari, Roberts, Dyer 2018; see NOTES.md).

  python -m launch.reproduce --experiment=fig1_fc_mnist
  python -m launch.reproduce --experiment=table1 --dataset=idx:../shared/data/fashion-mnist
  python -m launch.reproduce --experiment=fig2_subspace_overlap --dataset=gaussian_mixture
  python -m launch.reproduce --experiment=appB_spectrum --smoke        # seconds, CPU
  python -m launch.reproduce --experiment=dom_bulk_sgd --dataset=gaussian_mixture

Sizes below are the paper's settings (MNIST/CIFAR through tfds); --smoke shrinks any of them to
CPU seconds, --dataset swaps the data (offline: idx:DIR or gaussian_mixture), --num_analysis
measures g and H on a fixed subset instead of the whole training set. The FC-on-MNIST experiments
(fig1_fc_mnist, fig2, fig3, fig6, fig8, fig11) share one run, trained and analysed once.
"""

from __future__ import annotations

import ml_collections

from hessian_subspace.paper import reproduce

ConfigDict = ml_collections.ConfigDict

# Transforms needed for the FC-on-MNIST figures (one shared analysis).
# The `analysis` block of a run is hessian_subspace.analysis.config.default_config() (one
# section per transform, its fields the factory's arguments) plus `steps`, `min_step`,
# `test_metrics`, `live` (hessian_subspace.paper.reproduce.analysis_block).
_FULL = "loss,gradient,eigenpairs,f_top,overlap_g_hg,c2,layers,subspace_overlap"
_FTOP = "loss,gradient,eigenpairs,f_top"
_TABLE = "loss,gradient,overlap_g_hg"
_FTOP_ANALYSIS = dict(transforms=_FTOP, subspace_overlap=dict(reference_steps=(0,)))


def _fc_mnist(**overrides):
    base = dict(
        data=dict(name="mnist"),
        model=dict(name="fc", kwargs=dict(hidden=(100, 100), activation="relu")),
        optimizer=dict(name="sgd", learning_rate=0.1), batch_size=64, num_steps=1000,
        checkpoint_schedule="1:100,10:400,50",
        analysis=dict(transforms=_FULL,
                      subspace_overlap=dict(reference_steps=(0, 10, 50, 100, 200, 400))))
    return reproduce.make_run(**_deep_update(base, overrides))


def _convnet_cifar10(**overrides):
    base = dict(
        data=dict(name="cifar10"),
        model=dict(name="convnet", kwargs=dict(dropout=False, batch_norm=False,
                                                extra_dense=False)),
        optimizer=dict(name="sgd", learning_rate=0.1), batch_size=64, num_steps=1000,
        checkpoint_schedule="1:20,10:100,50",
        analysis=_FTOP_ANALYSIS)
    return reproduce.make_run(**_deep_update(base, overrides))


def _deep_update(base: dict, overrides: dict) -> dict:
    """Nested update; an empty dict replaces (``kwargs={}``: no options)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def _experiment(name, kind, description, runs, **extra) -> ConfigDict:
    config = ConfigDict()
    config.name = name
    config.kind = kind
    config.description = description
    config.runs = ConfigDict(runs)
    config.plot = ConfigDict(extra.pop("plot", {}))
    config.paper = ConfigDict(extra.pop("paper", {}))
    config.labels = ConfigDict(extra.pop("labels", {}))
    config.order = list(runs)  # the paper's order (ConfigDict sorts its keys)
    return config


def _table1_run(make, **overrides):
    # Mean overlap(g, Hg) over the last 1,000 of 3,000 steps, measured every 100 steps.
    table = dict(num_steps=3000, checkpoint_schedule="100",
                 analysis=dict(transforms=_TABLE, min_step=2000))
    return make(**_deep_update(table, overrides))


EXPERIMENTS = {
    "fig1_fc_mnist": lambda: _experiment(
        "fig1_fc_mnist", "fig1",
        "Fig. 1(a,b): f_top, train loss and accuracy, FC 2x100 on MNIST, SGD batch 64, lr 0.1.",
        {"fc_mnist": _fc_mnist()}),
    "fig1_convnet_cifar10": lambda: _experiment(
        "fig1_convnet_cifar10", "fig1",
        "Fig. 1(c,d): f_top, loss, accuracy of the Keras ConvNet on CIFAR-10.",
        {"convnet_cifar10": _convnet_cifar10()}),
    "fig1_resnet18_cifar10": lambda: _experiment(
        "fig1_resnet18_cifar10", "fig1",
        "Fig. 1(e,f): f_top, loss, accuracy of ResNet-18 on CIFAR-10.",
        {"resnet18_cifar10": _convnet_cifar10(model=dict(name="resnet18", kwargs={}))}),
    "table1": lambda: _experiment(
        "table1", "table1",
        "Table 1: mean overlap(g, Hg) over the last 1,000 steps of 3,000.",
        {
            "mnist_softmax": _table1_run(_fc_mnist, model=dict(name="softmax", kwargs={})),
            "mnist_fc_softplus": _table1_run(
                _fc_mnist, model=dict(kwargs=dict(activation="softplus"))),
            "mnist_fc_lr001": _table1_run(_fc_mnist, optimizer=dict(learning_rate=0.01)),
            "mnist_fc_batch256": _table1_run(_fc_mnist, batch_size=256),
            "mnist_fc_random_labels": _table1_run(
                _fc_mnist, data=dict(label_transform="shuffle")),
            "cifar10_convnet_random_labels": _table1_run(
                _convnet_cifar10, data=dict(label_transform="shuffle")),
            "cifar10_convnet_dropout_bn_dense": _table1_run(
                _convnet_cifar10, model=dict(kwargs=dict(dropout=True, batch_norm=True,
                                                         extra_dense=True))),
            "cifar10_convnet_adam": _table1_run(
                _convnet_cifar10, optimizer=dict(name="adam", learning_rate=1e-3)),
            "sine_regression_fc": _table1_run(
                _fc_mnist, task="regression",
                data=dict(name="sine", kwargs=dict(num_examples=1000, noise=0.1)),
                model=dict(name="fc_regression", kwargs=dict(hidden=(100, 100))),
                batch_size=100),
        },
        paper={"mnist_softmax": 0.96, "mnist_fc_softplus": 0.96, "mnist_fc_lr001": 0.96,
               "mnist_fc_batch256": 0.97, "mnist_fc_random_labels": 0.86,
               "cifar10_convnet_random_labels": 0.86,
               "cifar10_convnet_dropout_bn_dense": 0.93, "cifar10_convnet_adam": 0.89,
               "sine_regression_fc": 0.99},
        labels={"mnist_softmax": "MNIST softmax", "mnist_fc_softplus": "MNIST FC softplus",
                "mnist_fc_lr001": "MNIST FC lr 0.01", "mnist_fc_batch256": "MNIST FC batch 256",
                "mnist_fc_random_labels": "MNIST FC random labels",
                "cifar10_convnet_random_labels": "CIFAR10 ConvNet random labels",
                "cifar10_convnet_dropout_bn_dense": "CIFAR10 ConvNet dropout+BN+dense",
                "cifar10_convnet_adam": "CIFAR10 ConvNet Adam",
                "sine_regression_fc": "Regression (sine) FC batch 100"}),
    "fig2_subspace_overlap": lambda: _experiment(
        "fig2_subspace_overlap", "fig2",
        "Fig. 2: overlap of the top-k (and next-k) subspaces at t1 and t2 vs t2 - t1.",
        {"fc_mnist": _fc_mnist()}, plot=dict(t1=[0, 10, 50, 100, 200, 400])),
    "fig3_overlap_vs_dim": lambda: _experiment(
        "fig3_overlap_vs_dim", "fig3",
        "Fig. 3/9/10: mean subspace overlap vs dimension d = 2..2k for fixed t1.",
        {"fc_mnist": _fc_mnist()}, plot=dict(t1=[100, 200])),
    "fig11_eigenvector_overlaps": lambda: _experiment(
        "fig11_eigenvector_overlaps", "fig11",
        "Fig. 11: c_i^2 for i = 1..20 at steps 0, 50, 100, 200 (FC 100-100, MNIST).",
        {"fc_mnist": _fc_mnist()}, plot=dict(steps=[0, 50, 100, 200]),
        paper={"sum_top_step_0": 0.20, "sum_top_step_50": 0.935, "sum_next": 0.01}),
    "fig12_variants": lambda: _experiment(
        "fig12_variants", "fig12",
        "Fig. 12 / App. D: f_top for lr 0.01, batch 256, no hidden layer, softplus, random "
        "labels, Adam.",
        {
            "baseline": _fc_mnist(analysis=_FTOP_ANALYSIS,
                                  checkpoint_schedule="1:10,10:100,50"),
            "lr001": _fc_mnist(optimizer=dict(learning_rate=0.01),
                                analysis=_FTOP_ANALYSIS,
                                checkpoint_schedule="1:10,10:100,50"),
            "batch256": _fc_mnist(batch_size=256,
                                  analysis=_FTOP_ANALYSIS,
                                  checkpoint_schedule="1:10,10:100,50"),
            "no_hidden": _fc_mnist(model=dict(name="softmax", kwargs={}),
                                   analysis=_FTOP_ANALYSIS,
                                   checkpoint_schedule="1:10,10:100,50"),
            "softplus": _fc_mnist(model=dict(kwargs=dict(activation="softplus")),
                                  analysis=_FTOP_ANALYSIS,
                                  checkpoint_schedule="1:10,10:100,50"),
            "random_labels": _fc_mnist(data=dict(label_transform="shuffle"),
                                       analysis=_FTOP_ANALYSIS,
                                       checkpoint_schedule="1:10,10:100,50"),
            "adam": _fc_mnist(optimizer=dict(name="adam", learning_rate=1e-3),
                              analysis=_FTOP_ANALYSIS,
                              checkpoint_schedule="1:10,10:100,50"),
        },
        labels={"baseline": "SGD lr 0.1, batch 64", "lr001": "lr 0.01",
                "batch256": "batch 256", "no_hidden": "no hidden layer",
                "softplus": "softplus", "random_labels": "random labels",
                "adam": "Adam lr 1e-3"}),
    "fig8_lambda_max": lambda: _experiment(
        "fig8_lambda_max", "fig8", "Fig. 8: the largest Hessian eigenvalue during training.",
        {"fc_mnist": _fc_mnist()}),
    "fig6_eigenvector_anatomy": lambda: _experiment(
        "fig6_eigenvector_anatomy", "fig6",
        "Fig. 6-7: components of the top eigenvector by layer at steps 0, 100, 200, 400.",
        {"fc_mnist": _fc_mnist()}, plot=dict(steps=[0, 100, 200, 400])),
    "appB_spectrum": lambda: _experiment(
        "appB_spectrum", "spectrum",
        "App. B: full spectrum of FC 32-32 on MNIST after 40 epochs (Fig. 4) and the SLQ "
        "density of FC 256-256 on CIFAR-100 (Fig. 5).",
        {
            "fc32_mnist": _fc_mnist(
                model=dict(kwargs=dict(hidden=(32, 32))), num_steps=37500,
                checkpoint_schedule="37500",
                analysis=dict(transforms="loss,gradient,eigenpairs,dense_spectrum",
                              dense_spectrum=dict(steps=(37500,)), steps=(37500,),
                              subspace_overlap=dict(reference_steps=()))),
            "fc256_cifar100": _fc_mnist(
                data=dict(name="cifar100"), model=dict(kwargs=dict(hidden=(256, 256))),
                num_steps=5000, checkpoint_schedule="5000",
                analysis=dict(transforms="loss,gradient,eigenpairs,slq",
                              slq=dict(steps=(5000,), num_probes=20, num_steps=120),
                              steps=(5000,), subspace_overlap=dict(reference_steps=()))),
        },
        paper={"fc32_mnist_outliers": 10, "fc256_cifar100_outliers": 100}),
    "appB_even_odd": lambda: _experiment(
        "appB_even_odd", "labels",
        "App. B: MNIST relabelled even/odd (2 classes) has 2 large eigenvalues.",
        {"fc_mnist_even_odd": _fc_mnist(
            data=dict(label_transform="even_odd"), num_steps=2000,
            checkpoint_schedule="1:10,10:100,250",
            analysis=dict(_FTOP_ANALYSIS, k=10))},
        paper={"outliers": 2}),
    "appB_random_labels": lambda: _experiment(
        "appB_random_labels", "labels",
        "App. B: with randomly permuted labels there are still k = 10 large eigenvalues. "
        "Trained until the random labels are memorised: a 5,000-example subset, 30,000 steps "
        "(384 epochs).",
        {"fc_mnist_random_labels": _fc_mnist(
            data=dict(label_transform="shuffle", num_train=5000), num_steps=30000,
            checkpoint_schedule="1:10,10:100,100:1000,1000", log_every=500,
            analysis=dict(_FTOP_ANALYSIS, k=10))},
        paper={"outliers": 10}),
}


def _subspace_run(name, **optimizer):
    # SGD, Dom-SGD, Bulk-SGD, low-rank Newton: same init, data order, steps, analysis.
    return _fc_mnist(
        optimizer=dict(name=name, learning_rate=0.1, refresh_every=10,
                       curvature_examples=2000, curvature_batch_size=1000, **optimizer),
        checkpoint_schedule="1:10,10:100,50",
        analysis=_FTOP_ANALYSIS)


def _adam_run(name, **optimizer):
    # Adam and GaLore's projected Adam (Zhao et al. 2024) beside them: same init, data order,
    # steps and analysis; lr 1e-3 (Adam's scale, not SGD's).
    return _fc_mnist(optimizer=dict(name=name, learning_rate=1e-3, **optimizer),
                     checkpoint_schedule="1:10,10:100,50", analysis=_FTOP_ANALYSIS)


EXPERIMENTS.update({
    "dom_bulk_sgd": lambda: _experiment(
        "dom_bulk_sgd", "optim",
        "SGD vs Dom-SGD (updates projected onto the top-k Hessian subspace) vs Bulk-SGD (onto "
        "its complement), same initialisation and data order; the basis is recomputed every 10 "
        "steps on a fixed 2,000-example set (Song, Ahn, Yun 2024). Beside them Adam and GaLore "
        "(Adam in each matrix's rank-16 gradient subspace, refreshed every 200 steps; Zhao et "
        "al. 2024), lr 1e-3.",
        {"sgd": _subspace_run("sgd"), "dom_sgd": _subspace_run("dom_sgd"),
         "bulk_sgd": _subspace_run("bulk_sgd"), "adam": _adam_run("adam"),
         "galore": _adam_run("galore", rank=16, refresh_every=200, scale=0.25)},
        labels={"sgd": "SGD", "dom_sgd": "Dom-SGD", "bulk_sgd": "Bulk-SGD", "adam": "Adam",
                "galore": "GaLore (rank 16, T = 200)"}),
    "low_rank_newton": lambda: _experiment(
        "low_rank_newton", "optim",
        "SGD vs low-rank Newton (eq. 11: step -(|H_top| + delta)^-1 g_top, top-k refreshed every "
        "10 steps) for damping delta = 0.1, 1, 10.",
        {"sgd": _subspace_run("sgd"),
         **{f"newton_damping_{tag}": _subspace_run("low_rank_newton", damping=d, step_size=1.0)
            for tag, d in (("0p1", 0.1), ("1", 1.0), ("10", 10.0))}},
        labels={"sgd": "SGD", "newton_damping_0p1": "low-rank Newton, δ = 0.1",
                "newton_damping_1": "low-rank Newton, δ = 1",
                "newton_damping_10": "low-rank Newton, δ = 10"}),
})


def _transformer_lm():
    # A GPT-2-style decoder (pre-LN, causal attention), byte-level language model on the help
    # text that ships with Python; Adam, whose second moment the analysis reads back.
    return reproduce.make_run(
        data=dict(name="text:pydoc", kwargs=dict(context=64), num_analysis=128, num_test=256),
        model=dict(name="gpt", kwargs=dict(context=64, width=64, depth=2, heads=4)),
        optimizer=dict(name="adam", learning_rate=3e-3), batch_size=32, num_steps=1000,
        checkpoint_schedule="1:10,10:100,100", eval_batch_size=256,
        analysis=dict(
            transforms="loss,gradient,eigenpairs,f_top,subspace_overlap,f_top_curve,"
                       "block_spectra,adam",
            k=30, operator=dict(batch_size=128), eigenpairs=dict(memory_budget=1e8),
            f_top=dict(num_minibatches=2), f_top_curve=dict(ks=(10, 50)),
            subspace_overlap=dict(reference_steps=(0, 100)),
            block_spectra=dict(steps=(0, 100, 1000), k=4, slq_probes=4, slq_steps=30),
            adam=dict(k=10), steps=(0, 10, 50, 100, 200, 500, 1000)))


EXPERIMENTS["transformer_lm"] = lambda: _experiment(
    "transformer_lm", "transformer",
    "Beyond the paper: a GPT-style decoder as a byte-level language model (Python's pydoc "
    "text); f_top for k = 10, 50 and where it saturates, per-block spectra (Zhang et al. 2024) "
    "and the Adam-preconditioned Hessian.",
    {"gpt_pydoc": _transformer_lm()})


def _gd_run(learning_rate: float):
    # Full-batch gradient descent (batch = the 5,000-example training subset, no momentum);
    # λ_max and f_top measured live, every 20 steps, on the same 5,000 examples.
    return _fc_mnist(
        data=dict(num_train=5000), batch_size=5000, num_steps=2000,
        optimizer=dict(name="sgd", learning_rate=learning_rate),
        checkpoint_schedule="20", log_every=100,
        analysis=dict(transforms="loss,gradient,eigenpairs,f_top,overlap_g_hg",
                      subspace_overlap=dict(reference_steps=()), live=True,
                      f_top=dict(num_minibatches=0), operator=dict(batch_size=5000)))


EXPERIMENTS["edge_of_stability"] = lambda: _experiment(
    "edge_of_stability", "sharpness",
    "Beyond the paper (Cohen et al. 2021): full-batch GD on 5,000 examples with several step "
    "sizes; λ_max tracked live rises (progressive sharpening) until it reaches 2/η and hovers "
    "there (the edge of stability); does the gradient stay in the top subspace there?",
    {f"gd_lr_{tag}": _gd_run(lr) for tag, lr in (("0p02", 0.02), ("0p05", 0.05),
                                                  ("0p1", 0.1))},
    labels={"gd_lr_0p02": "η = 0.02 (2/η = 100)", "gd_lr_0p05": "η = 0.05 (2/η = 40)",
            "gd_lr_0p1": "η = 0.1 (2/η = 20)"})


def get_config(arg: str | None = None) -> ConfigDict:
    """The experiment named ``arg`` (see ``EXPERIMENTS``)."""
    if arg not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {arg!r}; choose from {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[arg]()


# Beyond the paper, issue 20: where the loss decreases, and the landscape along directions.
_DECREASE = "loss,gradient,eigenpairs,f_top,loss_decrease"


def _decrease_runs():
    # Each run also checkpoints a window of consecutive steps, so that the top and bulk parts
    # can be summed over every step of it (their sum is the loss change over the window).
    fc = _fc_mnist(data=dict(num_analysis=2000), checkpoint_schedule="1:10,10:100,50:500,1:540,50",
                   analysis=dict(transforms=_DECREASE, f_top=dict(num_minibatches=0),
                                 subspace_overlap=dict(reference_steps=())))
    gd = _gd_run(0.1)
    gd.analysis.transforms = _DECREASE
    gd.num_steps = 600
    gd.checkpoint_schedule = "1:10,20:300,1:340,20"
    gpt = _transformer_lm()
    gpt.analysis.transforms = _DECREASE
    gpt.analysis.k = 10
    gpt.analysis.f_top.num_minibatches = 0
    gpt.checkpoint_schedule = "1:10,10:100,100:500,1:520,100"
    gpt.analysis.steps = (0, 10, 50, 100, 300, *range(500, 521), 1000)
    return {"sgd": fc, "gd_edge_of_stability": gd, "adam_gpt": gpt}


EXPERIMENTS["loss_decrease"] = lambda: _experiment(
    "loss_decrease", "loss_decrease",
    "Beyond the paper (Song, Ahn, Yun 2024): at each checkpoint the loss change of the "
    "optimizer's next step u and of its parts in the top-k Hessian subspace (P_top u) and in "
    "the bulk (P_bulk u), exact on the analysis set, beside the second-order predictions "
    "g^T d + d^T H d / 2. SGD as in Fig. 1 (the run's next mini-batch), full-batch GD at the "
    "edge of stability (eta = 0.1, 5,000 examples), Adam on the transformer LM (its moments "
    "from the checkpoint). Does the loss go down in the top subspace or in the bulk?",
    _decrease_runs(),
    labels={"sgd": "SGD, batch 64", "gd_edge_of_stability": "GD at the edge of stability",
            "adam_gpt": "Adam, transformer LM"})


def _landscape_run():
    return _fc_mnist(
        data=dict(num_analysis=2000), checkpoint_schedule="1:10,10:100,50",
        analysis=dict(transforms="loss,gradient,eigenpairs,loss_landscape",
                      subspace_overlap=dict(reference_steps=()), steps=(0, 50, 1000),
                      loss_landscape=dict(radius=1.0, num_points=41, surface_points=21)))


EXPERIMENTS["loss_landscape"] = lambda: _experiment(
    "loss_landscape", "landscape",
    "Beyond the paper (PyHessian's plots, Li et al. 2018): the loss along the top-2 Hessian "
    "eigenvectors, random directions in the bulk, random directions and the gradient "
    "(unit norm), and 2-D surfaces over (v1, v2) and (v1, random), at steps 0, 50, 1000 of "
    "the Fig. 1 run; each slice's curvature at 0 against d^T H d.",
    {"sgd": _landscape_run()}, labels={"sgd": "SGD, batch 64"})


# Why k? Papyan's class/cross-class decomposition and the class-mean gradients.
_CLASSES = dict(transforms="loss,gradient,eigenpairs,f_top,class_mean_subspace",
                f_top=dict(num_minibatches=0), subspace_overlap=dict(reference_steps=()))

EXPERIMENTS["class_mean_subspace"] = lambda: _experiment(
    "class_mean_subspace", "classes",
    "Beyond the paper (Papyan 2019, 2020): is the top-k Hessian subspace the span of the k "
    "class-mean gradients E[grad l | y = c]? Papyan's decomposition of the Gauss-Newton "
    "matrix at the class and cross-class means (G0, G1 = class means, G2 = cross-class, "
    "G1+2), their eigenvalues beside the Hessian's, and the overlap (eq. 5) of each span with "
    "the top-k Hessian and Gauss-Newton subspaces; FC and ConvNet, and even/odd labels "
    "(k = 2).",
    {"fc": _fc_mnist(data=dict(num_analysis=2000), checkpoint_schedule="1:10,10:100,50",
                     analysis=dict(_CLASSES, steps=(0, 10, 50, 100, 200, 400, 1000))),
     "convnet": _convnet_cifar10(data=dict(num_analysis=256),
                                 analysis=dict(_CLASSES, steps=(0, 100, 1000))),
     "fc_even_odd": _fc_mnist(data=dict(label_transform="even_odd", num_analysis=2000),
                              checkpoint_schedule="1:10,10:100,250",
                              analysis=dict(_CLASSES, steps=(0, 10, 100, 1000)))},
    labels={"fc": "FC 100-100", "convnet": "ConvNet", "fc_even_odd": "FC, even/odd labels"})


# GaLore's gradient subspace against the Hessian's (Zhao et al. 2024).
def _galore_runs():
    fc = _fc_mnist(data=dict(num_analysis=2000), checkpoint_schedule="1:10,10:100,50",
                   analysis=dict(transforms="loss,gradient,galore_subspace",
                                 subspace_overlap=dict(reference_steps=()),
                                 steps=(0, 10, 50, 100, 150, 200, 250, 300, 400, 600, 800, 1000),
                                 galore_subspace=dict(rank=8, refresh_every=200)))
    gpt = _transformer_lm()
    gpt.analysis.transforms = "loss,gradient,galore_subspace"
    gpt.analysis.steps = (0, 10, 50, 100, 200, 300, 500, 1000)
    gpt.analysis.galore_subspace.rank = 8
    gpt.analysis.galore_subspace.refresh_every = 200
    return {"fc_sgd": fc, "gpt_adam": gpt}


EXPERIMENTS["galore_subspace"] = lambda: _experiment(
    "galore_subspace", "galore",
    "Beyond the paper (Zhao et al. 2024): per weight matrix, GaLore's rank-r gradient "
    "projector (top-r singular vectors of the gradient) against the top-r eigenvectors of the "
    "Hessian's diagonal block on that matrix: the share of the block's top subspace inside "
    "GaLore's subspace, the overlap of their row (column) directions, and how stale the "
    "projector gets between refreshes (T = 200). FC on Fashion-MNIST (SGD) and the "
    "transformer LM (Adam); GaLore as an optimizer is in dom_bulk_sgd.",
    _galore_runs(), labels={"fc_sgd": "FC 100-100, SGD", "gpt_adam": "transformer LM, Adam"})
