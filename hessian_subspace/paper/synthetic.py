"""The paper's synthetic data sets: the Gaussian mixture of §3 and the sine regression task of
Table 1. Both are deterministic functions of their seed; :func:`hessian_subspace.paper.data.
load_dataset` loads them by name ("gaussian_mixture", "sine")."""

from __future__ import annotations

from typing import Any

import numpy as np

from hessian_subspace import _tree

_TEST_STREAM = 1  # the "test" split of a synthetic set draws its examples from rng([seed, 1])


def _check_split(split: str, name: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"{name}: `split` must be 'train' or 'test', got {split!r}.")


def gaussian_mixture(*, num_classes: int, dim: int, num_examples: int, sigma: float,
                     seed: int = 0, orthogonal_means: bool = False,
                     split: str = "train") -> dict[str, Any]:
    """The paper's toy data (§3): k classes, x ~ N(μ_y, σ² I) with random unit means μ_y.

    Labels are balanced (example a has class a mod k, then shuffled). The means depend on ``seed``
    only; the "test" split draws its labels and noise from ``np.random.default_rng([seed, 1])``,
    so it shares the training means but not the training examples.

    >>> train = gaussian_mixture(num_classes=2, dim=3, num_examples=4, sigma=0.1)
    >>> test = gaussian_mixture(num_classes=2, dim=3, num_examples=4, sigma=0.1, split="test")
    >>> bool(np.array_equal(train["means"], test["means"]))
    True
    >>> bool(np.array_equal(train["x"], test["x"]))
    False

    Args:
      num_classes: k.
      dim: input dimension d.
      num_examples: n.
      sigma: noise standard deviation σ (0 puts every example on its class mean).
      seed: seed of the means, labels and noise.
      orthogonal_means: make the means exactly orthonormal (needs k <= d), as in App. E.
      split: "train" (the historical stream of ``seed``) or "test" (same means, new examples).

    Returns:
      ``{"x": float32 (n, d), "y": int32 (n,), "means": float32 (k, d)}``.
    """
    _check_split(split, "gaussian_mixture")
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
    if dim < 1 or num_examples < 1:
        raise ValueError("`dim` and `num_examples` must be >= 1.")
    if sigma < 0:
        raise ValueError(f"`sigma` must be >= 0, got {sigma}.")
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim))
    if orthogonal_means:
        if num_classes > dim:
            raise ValueError("orthogonal means need num_classes <= dim.")
        means = np.linalg.qr(means.T)[0].T
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    if split == "test":
        rng = np.random.default_rng([seed, _TEST_STREAM])
    y = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
    x = means[y] + sigma * rng.normal(size=(num_examples, dim))
    return {"x": x.astype(np.float32), "y": y, "means": means.astype(np.float32)}


def sine_regression(num_examples: int, noise: float = 0.1, seed: int = 0, *,
                    split: str = "train") -> dict[str, np.ndarray]:
    """The paper's regression task (Table 1): one period of a sine with Gaussian noise.

    The input is the phase scaled to [-1, 1): x ~ U[-1, 1), y = sin(π(x + 1)) + ε with
    ε ~ N(0, noise²). (The paper does not say how inputs were scaled. Raw phases in [0, 2π)
    make SGD with the paper's η = 0.1 diverge at the first step for FC 1-100-100-1 — loss
    1.3 → 3e4 — after which every ReLU is dead and the net outputs a constant; scaled, the
    same run reaches the noise floor, mean squared error 0.011.) The "test" split draws from
    ``np.random.default_rng([seed, 1])`` instead of ``default_rng(seed)``.

    >>> ds = sine_regression(5)
    >>> ds["x"].shape, ds["y"].shape, ds["y"].dtype
    ((5, 1), (5, 1), dtype('float32'))

    Args:
      num_examples: n.
      noise: standard deviation of the additive Gaussian noise (paper: 0.1).
      seed: seed of inputs and noise.
      split: "train" or "test" (a different seed stream).

    Returns:
      ``{"x": float32 (n, 1) in [-1, 1), "y": float32 (n, 1)}``.
    """
    _check_split(split, "sine")
    if num_examples < 1:
        raise ValueError(f"`num_examples` must be >= 1, got {num_examples}.")
    if noise < 0:
        raise ValueError(f"`noise` must be >= 0, got {noise}.")
    rng = np.random.default_rng(seed if split == "train" else [seed, _TEST_STREAM])
    x = rng.uniform(-1.0, 1.0, size=(num_examples, 1))
    y = np.sin(np.pi * (x + 1.0)) + noise * rng.normal(size=(num_examples, 1))
    # Rounding to float32 could reach 1; keep the half-open interval the docstring promises.
    x32 = np.minimum(x.astype(np.float32), np.nextafter(np.float32(1.0), np.float32(0)))
    return {"x": x32, "y": y.astype(np.float32)}


TEXT_SOURCES = ("pydoc",)


def text_corpus(source: str = "pydoc") -> bytes:
    """A real English text that ships with Python, as bytes: ``"pydoc"`` is the help text of
    every statement, operator and topic in ``pydoc_data.topics`` (about 465 KB of prose and
    code samples, the text ``help()`` shows), in sorted topic order."""
    if source != "pydoc":
        raise ValueError(f"unknown text source {source!r}; known: {TEXT_SOURCES}")
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics)).encode("utf-8")


def text_sequences(source: str = "pydoc", *, context: int = 64, split: str = "train",
                   test_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Byte-level language modelling examples from :func:`text_corpus`: consecutive windows of
    ``context`` bytes ``x`` and the next byte at each position ``y`` (both int32
    ``(n, context)``, values < 256). The first ``1 - test_fraction`` of the text is "train",
    the rest "test".

    >>> ds = text_sequences(context=8)
    >>> ds["x"].shape[1], bool((ds["x"][:, 1:] == ds["y"][:, :-1]).all())
    (8, True)
    """
    _check_split(split, f"text:{source}")
    context = _tree.check_int("context", context, 1)
    data = np.frombuffer(text_corpus(source), dtype=np.uint8).astype(np.int32)
    cut = int(len(data) * (1 - test_fraction))
    data = data[:cut] if split == "train" else data[cut:]
    n = (len(data) - 1) // context
    if n < 1:
        raise ValueError(f"`context` {context} is longer than the {split} text")
    x = data[: n * context].reshape(n, context)
    y = data[1: n * context + 1].reshape(n, context)
    return {"x": x, "y": y}
