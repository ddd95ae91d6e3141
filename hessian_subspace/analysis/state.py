"""Transform state as named arrays: what the store persists after every checkpoint.

A transform's state is a pytree it returns from ``update`` (``init`` gives the one before the
first checkpoint). The store keeps the chain's state after each checkpoint under **names** —
``TRANSFORM/KEY/...``, the state's key paths — so resuming is loading the state of the last
analysed checkpoint, and no transform reads another's files. Equal arrays are one file
(content-addressed): ``subspace_overlap``'s reference bases, the same at every later
checkpoint, and ``eigenpairs``' basis, which ``subspace_overlap`` keeps too, are stored once.

:func:`named` flattens a chain's state into ``{name: numpy array}``; :func:`rebuild` turns
them back into the pytree, with the ``init`` state's structure when the names are its leaves
and as nested dicts otherwise. A state whose structure changes from checkpoint to checkpoint
(``subspace_overlap`` adds a reference basis) must therefore be nested dicts with string keys;
:func:`named` refuses any other that would not come back as it was.

Example:
  >>> import numpy as np
  >>> from hessian_subspace.analysis import state
  >>> leaves = state.named({"eigenpairs": {"step": 3, "eigenvectors": np.ones((2, 4))}})
  >>> sorted(leaves), leaves["eigenpairs/step"]
  (['eigenpairs/eigenvectors', 'eigenpairs/step'], array(3))
  >>> state.rebuild(leaves)["eigenpairs"]["eigenvectors"].shape
  (2, 4)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from hessian_subspace import _tree
from hessian_subspace.analysis import checks

PyTree = Any
SEP = "/"


def _part(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _names(tree: PyTree) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(SEP.join(_part(k) for k in path), leaf) for path, leaf in flat]


def _is_nested_dicts(tree: PyTree) -> bool:
    if isinstance(tree, dict):
        return all(isinstance(k, str) and k and SEP not in k and _is_nested_dicts(v)
                   for k, v in tree.items())
    return not isinstance(tree, (list, tuple)) and tree is not None


def named(states: Mapping[str, PyTree],
          templates: Mapping[str, PyTree] | None = None) -> dict[str, np.ndarray]:
    """The chain's state (transform name -> its state) as ``{name: host array}``.

    Raises:
      TransformContractError: a transform's state whose structure is not its ``init``
        state's and is not nested dicts with string keys (it could not be restored by name).
    """
    out: dict[str, np.ndarray] = {}
    for name, tree in states.items():
        leaves = _names({name: tree})
        if not leaves:
            continue
        template = None if templates is None else templates.get(name)
        same = template is not None and (jax.tree_util.tree_structure(tree)
                                         == jax.tree_util.tree_structure(template))
        if not same and not _is_nested_dicts(tree):
            raise checks.TransformContractError(
                f"transform {name!r} returned a state of another structure than its init "
                f"state's ({jax.tree_util.tree_structure(tree)}); a state that changes shape "
                "across checkpoints must be nested dicts of arrays with string keys (so that "
                "the store can restore it by name)")
        out.update((key, _tree.to_host(leaf)) for key, leaf in leaves)
    return out


def rebuild(leaves: Mapping[str, np.ndarray],
            templates: Mapping[str, PyTree] | None = None) -> dict[str, PyTree]:
    """The chain's state from :func:`named` leaves: each transform's with the structure of its
    template (``init`` state) when the names are exactly the template's leaves, else nested
    dicts. Transforms with no leaves get their template (their ``init`` state)."""
    templates = dict(templates or {})
    by_transform: dict[str, dict[str, np.ndarray]] = {}
    for key, value in leaves.items():
        name, _, rest = key.partition(SEP)
        by_transform.setdefault(name, {})[rest] = value
    out: dict[str, PyTree] = dict(templates)
    for name, own in by_transform.items():
        template = templates.get(name)
        if template is not None:
            names = [k.partition(SEP)[2] for k, _ in _names({name: template})]
            if names and sorted(names) == sorted(own):
                treedef = jax.tree_util.tree_structure(template)
                out[name] = jax.tree_util.tree_unflatten(treedef, [own[n] for n in names])
                continue
        if "" in own:  # the whole state is one array
            out[name] = own[""]
            continue
        nested: dict[str, Any] = {}
        for path, value in own.items():
            node = nested
            *parents, last = path.split(SEP)
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        out[name] = nested
    return out
