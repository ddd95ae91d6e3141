"""The context a checkpoint's transforms read from and add to.

A :class:`Context` is a read-only mapping. Before the first transform it holds the analyzer's
entries: ``step``, ``params`` (cast to the analysis dtype), ``state`` (frozen model state or
None), ``loss_fn`` (the user's loss with the state bound: ``loss_fn(params, batch)``), ``data``
and ``test_data`` (the fixed analysis and test sets), ``batch_size``, ``operator`` (the
curvature operator the analysis measures: the Hessian of the mean loss over ``data`` unless the
analyzer says otherwise), ``dtype``, ``precision``, ``seed``, ``extras`` (the rest of the
checkpoint, e.g. the optimizer state) and ``output_fn``/``output_loss`` (the Gauss-Newton split,
None unless given). Each transform's outputs are added under their keys.

It holds this checkpoint's values and the analysis' fixed inputs only: what a transform
carries from one checkpoint to the next is its own state (``update(ctx, state)``), and its
settings are its factory's arguments. Besides entries it offers other curvature operators at
this checkpoint (:meth:`Context.operator`), a PRNG key per checkpoint (:meth:`Context.rng`),
and an HVP counter for the record.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax

from hessian_subspace import curvature

PyTree = Any


class MissingEntry(KeyError):
    """A transform asked the context for an entry nothing has put there."""

    def __str__(self) -> str:  # KeyError would print the repr of the message.
        return str(self.args[0])


class Context(Mapping):
    """What a checkpoint's transforms read (see the module docstring)."""

    def __init__(self, step: int, entries: dict[str, Any], *, seed: int,
                 make_operator: Callable[..., Any], bind: Callable[[Callable], Any]):
        self.step = int(step)
        self._entries = dict(entries, step=self.step)
        self._seed = int(seed)
        self._make_operator = make_operator
        self._bind = bind
        self._operators: dict[tuple, Any] = {}
        self.hvps = 0
        self.current: str | None = None  # the transform running now (for error messages)

    # ---- mapping ---------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:
        try:
            return self._entries[name]
        except KeyError:
            who = f"transform {self.current!r}" if self.current else "a transform"
            raise MissingEntry(
                f"{who} asked for {name!r} at step {self.step}, but the context holds only "
                f"{sorted(self._entries)}; add the transform that provides it earlier in the "
                "chain (and list it in `requires` so the chain checks this before any work)"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, outputs: Mapping[str, Any]) -> None:
        """Adds a transform's outputs (the runner calls it after each transform)."""
        self._entries.update(outputs)

    # ---- services --------------------------------------------------------------------------

    def rng(self, salt: int = 0) -> jax.Array:
        """A PRNG key for this checkpoint: ``fold_in(key(seed + salt), step)`` (the same key for
        the same step, seed and salt, in every run)."""
        return jax.random.fold_in(jax.random.key(self._seed + int(salt)), self.step)

    def operator(self, curvature_name: str | None = None, *, block: Any = "default",
                 output_fn: Callable | None = None, output_loss: Callable | None = None):
        """A curvature operator at this checkpoint's parameters over ``data``.

        Args:
          curvature_name: "hessian" or "ggn" (None: the analyzer's).
          block: leaf-path prefixes to restrict to (:func:`hessian_subspace.restrict`); the
            default is the analyzer's block, None the whole parameter vector.
          output_fn, output_loss: the Gauss-Newton split (default: the analyzer's).

        Operators are built once per checkpoint and arguments.
        """
        key = (curvature_name, block if isinstance(block, (str, tuple, type(None))) else id(block),
               id(output_fn), id(output_loss))
        if key not in self._operators:
            self._operators[key] = self._make_operator(
                curvature_name, block=block, output_fn=output_fn, output_loss=output_loss)
        return self._operators[key]

    def bind(self, fn: Callable) -> Any:
        """``fn(params, batch[, state])`` with this checkpoint's model state bound, as a pytree
        (:func:`hessian_subspace.curvature.bind_state`), or ``fn`` itself as a pytree when there
        is no state. Jitted functions taking it compile once for every checkpoint."""
        return self._bind(fn)

    def count_hvps(self, n: int) -> None:
        """Adds ``n`` curvature-vector products to this checkpoint's ``hvps``."""
        self.hvps += int(n)


def default_bind(state: PyTree) -> Callable[[Callable], Any]:
    """The ``bind`` of a checkpoint with model state ``state`` (None: no state)."""
    if state is None:
        return curvature.as_loss_pytree
    return lambda fn: curvature.bind_state(fn, state)
