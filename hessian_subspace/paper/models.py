"""Flax linen models of the paper.

They are users of the toolkit like anyone's models: their loss for the metric pipeline is
``hessian_subspace.training.tasks.inference_loss(model, task)``, a plain
``loss(params, batch, state)`` with the model in inference mode (dropout off, BatchNorm on its
frozen running statistics); nothing in the numerical core or the pipeline knows about flax.

Models (every ``__call__(x, train=False)``), built by name with :func:`build_model`:

- ``"softmax"``: :class:`MLP` with no hidden layer (softmax regression).
- ``"fc"``: :class:`MLP`, e.g. 784-100-100-10 (89,610 parameters).
- ``"convnet"``: :class:`KerasConvNet`, the Keras ``cifar10_cnn.py`` net (1,250,858 parameters).
- ``"resnet18"``: :class:`ResNet18`, the CIFAR variant (11,173,962 parameters).
- ``"fc_regression"``: :class:`MLP` with one output, for the sine regression task.
- ``"small_convnet"``: :class:`SmallConvNet`, for tests and benchmarks.
- ``"gpt"``: :class:`GPT`, a GPT-2-style decoder for byte-level language modelling (issue 10's
  transformer; not in the paper).

References:
  Gur-Ari, Roberts, Dyer, "Gradient Descent Happens in a Tiny Subspace", arXiv:1812.04754
  (Table 1, Figs. 6-7).
  Keras examples, ``cifar10_cnn.py`` (the ConvNet).
  He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016; CIFAR variant
  as in github.com/kuangliu/pytorch-cifar ``models/resnet.py``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hessian_subspace import _tree

PyTree = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "softplus": nn.softplus,
    "tanh": jnp.tanh,
}

# BatchNorm convention shared by every model (Keras/PyTorch defaults: running averages updated
# as 0.9 * old + 0.1 * batch).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


# Kernel initialisers by name: {scheme}_{distribution}, the variance scale over fan-in (LeCun,
# He) or fan-in + fan-out (Glorot); biases start at zero. "lecun_truncated_normal" is flax's
# default (``nn.initializers.lecun_normal``), the default of every model here.
_SCHEMES = {"lecun": (1.0, "fan_in"), "he": (2.0, "fan_in"), "glorot": (1.0, "fan_avg")}
_DISTRIBUTIONS = ("normal", "truncated_normal", "uniform")
INITIALIZERS = tuple(f"{s}_{d}" for s in _SCHEMES for d in _DISTRIBUTIONS)
DEFAULT_INIT = "lecun_truncated_normal"


def kernel_init(name: str) -> Callable:
    """The kernel initialiser ``name`` (one of :data:`INITIALIZERS`, e.g. "he_normal")."""
    if name not in INITIALIZERS:
        raise ValueError(f"`initializer` must be one of {INITIALIZERS}, got {name!r}.")
    scheme, distribution = name.split("_", 1)
    scale, mode = _SCHEMES[scheme]
    return nn.initializers.variance_scaling(scale, mode, distribution)


def _check_inputs(model: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{model} takes float inputs, got {x.dtype}; scale integer images to "
                        "floats first (e.g. x.astype(np.float32) / 255).")


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                        epsilon=_BN_EPSILON, name=name)


# ------------------------------------------------------------------------------------ models


class MLP(nn.Module):
    """Fully connected net: flatten, hidden Dense layers, linear output.

    ``hidden=()`` is softmax regression. Layers are named ``dense_0 ... dense_L`` so
    parameter names (``dense_0/kernel``) survive into results.

    Attributes:
      hidden: widths of the hidden layers.
      num_outputs: number of logits (or regression outputs).
      activation: one of ``ACTIVATIONS`` ("relu", "softplus", "tanh").
      use_bias: whether every Dense layer has a bias (the toy model of §3 has none).
      initializer: kernel initialiser, one of :data:`INITIALIZERS`.
    """

    hidden: Sequence[int] = (100, 100)
    num_outputs: int = 10
    activation: str = "relu"
    use_bias: bool = True
    initializer: str = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps inputs ``(n, ...)`` to outputs ``(n, num_outputs)``; ``train`` is ignored."""
        del train
        _check_inputs("MLP", x)
        act = ACTIVATIONS[self.activation]
        init = kernel_init(self.initializer)
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = act(nn.Dense(width, use_bias=self.use_bias, kernel_init=init,
                             name=f"dense_{i}")(x))
        return nn.Dense(self.num_outputs, use_bias=self.use_bias, kernel_init=init,
                        name=f"dense_{len(self.hidden)}")(x)


class SmallConvNet(nn.Module):
    """A small conv net for tests and benchmarks: two 3x3 convs, max-pooling, a dense head."""

    channels: Sequence[int] = (8, 16)
    num_outputs: int = 10
    initializer: str = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images ``(n, h, w, c)`` to logits ``(n, num_outputs)``; ``train`` is ignored."""
        del train
        _check_inputs("SmallConvNet", x)
        init = kernel_init(self.initializer)
        for i, c in enumerate(self.channels):
            x = nn.relu(nn.Conv(c, (3, 3), kernel_init=init, name=f"conv_{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        return nn.Dense(self.num_outputs, kernel_init=init, name="dense_out")(x)


class KerasConvNet(nn.Module):
    """The ConvNet of the Keras example ``cifar10_cnn.py`` (paper Table 1, "ConvNet" rows).

    ``conv_0`` 32 3x3 SAME, ``conv_1`` 32 3x3 VALID, max-pool 2x2, [dropout 0.25],
    ``conv_2`` 64 3x3 SAME, ``conv_3`` 64 3x3 VALID, max-pool 2x2, [dropout 0.25], flatten,
    ``dense_0`` 512, [``dense_1`` 512], [dropout 0.5], ``dense_out``; relu after every hidden
    layer. On 32x32x3 inputs with every option off it has 1,250,858 parameters, as in Keras.

    Attributes:
      num_outputs: number of logits.
      dropout: add the three dropout layers (rng stream "dropout", active only when training).
      batch_norm: add BatchNorm (``bn_conv_i``, ``bn_dense_i``) after every conv and every hidden
        dense layer, before the relu. Convs and dense layers keep their biases, as in Keras.
      extra_dense: add ``dense_1``, a second Dense 512 + relu layer, before the output.
      width: multiplies every channel count and dense width (1.0: the Keras example; smaller
        values give fast smoke-test versions).
      initializer: kernel initialiser, one of :data:`INITIALIZERS`.
    """

    num_outputs: int = 10
    dropout: bool = False
    batch_norm: bool = False
    extra_dense: bool = False
    width: float = 1.0
    initializer: str = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images ``(n, h, w, c)`` to logits ``(n, num_outputs)``.

        Args:
          x: images of shape ``(n, h, w, c)``, h and w at least 10.
          train: dropout on and BatchNorm on batch statistics (updating ``batch_stats``) if
            True; dropout off and BatchNorm on the running averages if False.

        Returns:
          Logits of shape ``(n, num_outputs)``.
        """

        def hidden(layer, y, name):
            y = layer(y)
            if self.batch_norm:
                y = _batch_norm(train, f"bn_{name}")(y)
            return nn.relu(y)

        def drop(rate, y, i):
            if not self.dropout:
                return y
            return nn.Dropout(rate, deterministic=not train, name=f"dropout_{i}")(y)

        _check_inputs("KerasConvNet", x)
        init = kernel_init(self.initializer)
        scale = lambda n: max(1, int(round(n * self.width)))  # noqa: E731
        for stage, width in enumerate((scale(32), scale(64))):
            for j, padding in enumerate(("SAME", "VALID")):
                name = f"conv_{2 * stage + j}"
                x = hidden(nn.Conv(width, (3, 3), padding=padding, kernel_init=init, name=name),
                           x, name)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = drop(0.25, x, stage)
        x = jnp.reshape(x, (x.shape[0], -1))
        for i in range(2 if self.extra_dense else 1):
            x = hidden(nn.Dense(scale(512), kernel_init=init, name=f"dense_{i}"), x,
                       f"dense_{i}")
        x = drop(0.5, x, 2)
        return nn.Dense(self.num_outputs, kernel_init=init, name="dense_out")(x)


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN projection shortcut."""

    features: int
    strides: int = 1
    initializer: str = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = ((1, 1), (1, 1))  # PyTorch's padding=1, also for stride 2 (SAME would pad 0/1).
        init = kernel_init(self.initializer)
        y = nn.Conv(self.features, (3, 3), strides=self.strides, padding=pad, use_bias=False,
                    kernel_init=init, name="conv_0")(x)
        y = nn.relu(_batch_norm(train, "bn_0")(y))
        y = nn.Conv(self.features, (3, 3), padding=pad, use_bias=False, kernel_init=init,
                    name="conv_1")(y)
        y = _batch_norm(train, "bn_1")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=self.strides, padding="VALID",
                        use_bias=False, kernel_init=init, name="shortcut_conv")(x)
            x = _batch_norm(train, "shortcut_bn")(x)
        return nn.relu(y + x)


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant (kuangliu/pytorch-cifar): 11,173,962 parameters for 10 classes.

    ``conv_stem`` 64 3x3 stride 1 + ``bn_stem`` + relu (no max-pool); stages
    ``stage_{1..4}_block_{0,1}`` of basic blocks with 64, 128, 256, 512 channels, the first block
    of stages 2-4 with stride 2 and a projection shortcut; global average pooling;
    ``dense_out``. Convolutions have no bias (BatchNorm follows).

    Attributes:
      num_outputs: number of logits.
      width: channels of the stem and first stage (64 in the paper's model; the stages have
        width, 2 width, 4 width, 8 width). Smaller values give fast smoke-test versions.
      initializer: kernel initialiser, one of :data:`INITIALIZERS`.
    """

    num_outputs: int = 10
    width: int = 64
    initializer: str = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps images ``(n, h, w, c)`` to logits ``(n, num_outputs)``.

        Args:
          x: images of shape ``(n, h, w, c)``.
          train: BatchNorm on batch statistics (updating ``batch_stats``) if True, on the
            running averages if False.

        Returns:
          Logits of shape ``(n, num_outputs)``.
        """
        _check_inputs("ResNet18", x)
        w, init = self.width, kernel_init(self.initializer)
        x = nn.Conv(w, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=init,
                    name="conv_stem")(x)
        x = nn.relu(_batch_norm(train, "bn_stem")(x))
        for stage, width in enumerate((w, 2 * w, 4 * w, 8 * w), start=1):
            for block in range(2):
                strides = 2 if stage > 1 and block == 0 else 1
                x = _BasicBlock(width, strides, self.initializer,
                                name=f"stage_{stage}_block_{block}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_outputs, kernel_init=init, name="dense_out")(x)


class _Attention(nn.Module):
    """Causal multi-head self-attention with q, k, v, o projections (GPT-2)."""

    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        h = self.heads
        split = lambda y: y.reshape(n, t, h, d // h)  # noqa: E731
        q = split(nn.Dense(d, name="q")(x))
        k = split(nn.Dense(d, name="k")(x))
        v = split(nn.Dense(d, name="v")(x))
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(d // h)
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, t, d)
        return nn.Dense(d, name="o")(out)


class _Mlp(nn.Module):
    ratio: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        return nn.Dense(d, name="proj")(nn.gelu(nn.Dense(self.ratio * d, name="fc")(x)))


class _DecoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    heads: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + _Attention(self.heads, name="attn")(nn.LayerNorm(name="ln_1")(x))
        return x + _Mlp(self.mlp_ratio, name="mlp")(nn.LayerNorm(name="ln_2")(x))


class GPT(nn.Module):
    """A GPT-2-style decoder: token and learned position embeddings, ``depth`` pre-LN blocks
    of causal self-attention and a GELU MLP, a final LayerNorm and an untied output head.

    For byte-level language modelling ``num_outputs`` (the vocabulary) is 256; inputs are int
    tokens ``(n, t)`` with ``t <= context`` and the outputs next-token logits ``(n, t, vocab)``.
    Leaves are named so that they group into the blocks of Zhang et al. (2024) (see
    :func:`gpt_blocks`): ``token_embed``, ``position_embed``, ``block_i/ln_1``,
    ``block_i/attn/{q,k,v,o}``, ``block_i/ln_2``, ``block_i/mlp``, ``ln_f``, ``head``. No
    dropout, so training and inference agree (``train`` is ignored).

    References:
      Radford et al., "Language models are unsupervised multitask learners" (GPT-2), 2019.
    """

    num_outputs: int = 256
    context: int = 64
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        t = x.shape[1]
        h = nn.Embed(self.num_outputs, self.width, name="token_embed")(x)
        position = self.param("position_embed", nn.initializers.normal(0.02),
                              (self.context, self.width))
        h = h + position[:t]
        for i in range(self.depth):
            h = _DecoderBlock(self.heads, self.mlp_ratio, name=f"block_{i}")(h)
        h = nn.LayerNorm(name="ln_f")(h)
        return nn.Dense(self.num_outputs, use_bias=False, name="head")(h)


def gpt_blocks(depth: int) -> dict[str, str]:
    """The parameter blocks of :class:`GPT` for per-block spectra: ``{name: leaf prefix}``."""
    blocks = {"token_embed": "token_embed", "position_embed": "position_embed"}
    for i in range(depth):
        for part in ("ln_1", "attn/q", "attn/k", "attn/v", "attn/o", "ln_2", "mlp"):
            blocks[f"block_{i}/{part}"] = f"block_{i}/{part}"
    blocks.update(ln_f="ln_f", head="head")
    return blocks


# ---------------------------------------------------------------------------------- registry


def _init_name(initializer: str) -> str:
    kernel_init(initializer)  # validates
    return initializer


def _fc(num_outputs: int, hidden: Sequence[int] = (100, 100), activation: str = "relu",
        initializer: str = DEFAULT_INIT) -> MLP:
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {tuple(ACTIVATIONS)}, got {activation!r}.")
    hidden = tuple(hidden)
    if not all(isinstance(w, int) and w > 0 for w in hidden):
        raise ValueError(f"`hidden` must be a sequence of positive ints, got {hidden!r}.")
    return MLP(hidden=hidden, num_outputs=num_outputs, activation=activation,
               initializer=_init_name(initializer))


def _softmax(num_outputs: int, use_bias: bool = True, initializer: str = DEFAULT_INIT) -> MLP:
    return MLP(hidden=(), num_outputs=num_outputs, use_bias=bool(use_bias),
               initializer=_init_name(initializer))


def _convnet(num_outputs: int, dropout: bool = False, batch_norm: bool = False,
             extra_dense: bool = False, width: float = 1.0,
             initializer: str = DEFAULT_INIT) -> KerasConvNet:
    if not width > 0:
        raise ValueError(f"`width` must be > 0, got {width!r}.")
    return KerasConvNet(num_outputs=num_outputs, dropout=bool(dropout),
                        batch_norm=bool(batch_norm), extra_dense=bool(extra_dense),
                        width=float(width), initializer=_init_name(initializer))


def _resnet18(num_outputs: int, width: int = 64, initializer: str = DEFAULT_INIT) -> ResNet18:
    _tree.check_int("width", width, 1)
    return ResNet18(num_outputs=num_outputs, width=width, initializer=_init_name(initializer))


def _small_convnet(num_outputs: int, channels: Sequence[int] = (8, 16),
                   initializer: str = DEFAULT_INIT) -> SmallConvNet:
    return SmallConvNet(channels=tuple(channels), num_outputs=num_outputs,
                        initializer=_init_name(initializer))


def _gpt(num_outputs: int, context: int = 64, width: int = 64, depth: int = 2, heads: int = 4,
         mlp_ratio: int = 4) -> GPT:
    for name, value in (("context", context), ("width", width), ("depth", depth),
                        ("heads", heads), ("mlp_ratio", mlp_ratio)):
        _tree.check_int(name, value, 1)
    if width % heads:
        raise ValueError(f"`width` {width} must be a multiple of `heads` {heads}.")
    return GPT(num_outputs=num_outputs, context=context, width=width, depth=depth, heads=heads,
               mlp_ratio=mlp_ratio)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "softmax": _softmax,
    "fc": _fc,
    "convnet": _convnet,
    "resnet18": _resnet18,
    "fc_regression": _fc,
    "small_convnet": _small_convnet,
    "gpt": _gpt,
}

MODEL_NAMES = tuple(_BUILDERS)


def build_model(name: str, *, num_outputs: int, **kwargs: Any) -> nn.Module:
    """Builds a model of the paper by name.

    Args:
      name: one of ``MODEL_NAMES``: "softmax" (``use_bias=True``), "fc" (``hidden=(100, 100)``,
        ``activation="relu"``), "convnet" (``dropout``, ``batch_norm``, ``extra_dense``, all
        False by default; ``width=1.0``), "resnet18" (``width=64``), "fc_regression" (like "fc";
        the sine task uses ``num_outputs=1``), "small_convnet" (``channels=(8, 16)``); all but
        "gpt" take ``initializer``, the kernel initialiser (:data:`INITIALIZERS`, default
        "lecun_truncated_normal", flax's ``lecun_normal``).
      num_outputs: number of classes (or of regression outputs), a positive int.
      **kwargs: the model's options listed above.

    Returns:
      An unbound flax module whose ``__call__(x, train=False)`` returns ``(n, num_outputs)``.

    Raises:
      ValueError: for an unknown name, an unknown keyword argument or a bad option value.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model name {name!r}; known names: {MODEL_NAMES}.")
    _tree.check_int("num_outputs", num_outputs, 1)
    builder = _BUILDERS[name]
    allowed = [p for p in inspect.signature(builder).parameters if p != "num_outputs"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown keyword argument(s) {unknown} for model {name!r}; allowed: {allowed}.")
    return builder(num_outputs, **kwargs)


# ------------------------------------------------------------------------ variables


def init_params(model: nn.Module, key: jax.Array, example_x: jax.Array) -> PyTree:
    """Initial parameters of ``model`` for inputs shaped like ``example_x``.

    Drops any other collection; models with BatchNorm need
    :func:`hessian_subspace.training.tasks.init_variables`.
    """
    return model.init(key, example_x)["params"]


# ------------------------------------------------------------------------------ parameters


def param_count(params: PyTree) -> int:
    """Number of scalar parameters in ``params`` (the length of ``ravel_pytree(params)[0]``)."""
    return sum(math.prod(getattr(leaf, "shape", np.shape(leaf)))
               for leaf in jax.tree_util.tree_leaves(params))


__all__ = [
    "ACTIVATIONS", "DEFAULT_INIT", "INITIALIZERS", "MODEL_NAMES", "GPT", "KerasConvNet", "MLP",
    "ResNet18", "SmallConvNet",
    "build_model", "gpt_blocks", "init_params", "kernel_init", "param_count",
]
