"""The context a checkpoint's transforms read from and add to.

A :class:`Context` is a read-only mapping. Before the first transform it holds the analyzer's
entries: ``step``, ``params`` (cast to the analysis dtype), ``state`` (frozen model state or
None), ``loss_fn`` (the user's loss with the state bound: ``loss_fn(params, batch)``), ``data``
and ``test_data`` (the fixed analysis and test sets), ``batch_size``, ``operator`` (the
curvature operator the analysis measures: the Hessian of the mean loss over ``data`` unless the
analyzer says otherwise), ``dtype``, ``precision``, and ``output_fn``/``output_loss`` (the
Gauss-Newton split, None unless given). Each transform's outputs are added under their keys.

Besides entries it offers what needs the runner: other curvature operators
(:meth:`Context.operator`), arrays stored at earlier checkpoints (:meth:`Context.stored`), a
PRNG key per checkpoint (:meth:`Context.rng`), and an HVP counter for the record.
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
                 make_operator: Callable[..., Any], read_stored: Callable[[str, int], Any],
                 stored_steps: Callable[[str], list[int]], bind: Callable[[Callable], Any],
                 stored_content: Callable[[str, int], str | None] = lambda folder, step: None):
        self.step = int(step)
        self._entries = dict(entries, step=self.step)
        self._seed = int(seed)
        self._make_operator = make_operator
        self._read_stored = read_stored
        self._stored_steps = stored_steps
        self._stored_content = stored_content
        self._bind = bind
        # Arrays of other checkpoints this one read: the record lists them (``reads``: step,
        # folder, content fingerprint; ``values: False`` for a start vector only) and the ones
        # it asked for that did not exist yet (``waiting_for``), so that the store can tell
        # when the record must be computed again.
        self.reads: list[dict] = []
        self.waiting_for: list[dict] = []
        self._operators: dict[tuple, Any] = {}
        self._pending: dict[str, dict] = {}
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

    def hold_stored(self, folder: str, arrays: dict) -> None:
        """This checkpoint's arrays of ``folder``, before they are written: what
        :meth:`stored` returns for this step (the runner calls it)."""
        self._pending[folder] = arrays

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

    def stored(self, folder: str, step: int, *, values: bool = True) -> dict | None:
        """The arrays a transform stored in ``folder`` at ``step`` (this checkpoint's own, once
        an earlier transform stored them), or None.

        Reading another checkpoint's arrays makes this record depend on them: it is listed in
        the record (``reads``), and the record is computed again when those arrays change
        (their step recomputed) or, if they did not exist yet, once they do
        (``waiting_for``). ``values=False`` says the outputs do not depend on them beyond the
        solver's tolerance (a warm start): listed, never a reason to recompute.
        """
        step = int(step)
        if step == self.step and folder in self._pending:
            return self._pending[folder]
        arrays = self._read_stored(folder, step)
        entry = dict(step=step, folder=folder, by=self.current)
        if arrays is None:
            if values:
                self.waiting_for.append(entry)
        else:
            self.reads.append(dict(entry, content=self._stored_content(folder, step),
                                   values=bool(values)))
        return arrays

    def stored_steps(self, folder: str) -> list[int]:
        """Steps before this one with arrays in ``folder`` (successful checkpoints only)."""
        return [s for s in self._stored_steps(folder) if s < self.step]

    def count_hvps(self, n: int) -> None:
        """Adds ``n`` curvature-vector products to this checkpoint's ``hvps``."""
        self.hvps += int(n)


def default_bind(state: PyTree) -> Callable[[Callable], Any]:
    """The ``bind`` of a checkpoint with model state ``state`` (None: no state)."""
    if state is None:
        return curvature.as_loss_pytree
    return lambda fn: curvature.bind_state(fn, state)
