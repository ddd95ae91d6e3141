"""The public API as the README states it, and its conventions.

- Every name in the README's API tables exists, with the parameters the table shows: their
  order, which are keyword-only (after ``*``), and the defaults it prints; and no required
  parameter is left out of a row.
- Results are NamedTuples (fields by name, unpacking as a tuple still works).
- The operator argument is ``matvec`` everywhere; start vectors are pytrees or flat arrays alike.

Plain-function models only: the core is tested without flax.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessian_subspace as hs

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "README.md")


def _tables() -> list[tuple[str, list[str]]]:
    """(base module, first cells) of every ``| name | ...`` table of the API section."""
    with open(README) as f:
        text = f.read()
    section = text[text.index("## Public API"):text.index("## Layout")]
    tables, base = [], "hessian_subspace"
    lines = section.splitlines()
    for i, line in enumerate(lines):
        if "from hessian_subspace import analysis" in line:
            base = "hessian_subspace.analysis"
        elif line.startswith("Training and the paper"):
            base = "hessian_subspace"
        if line.startswith("| name |"):
            cells = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells.append(row.strip("|").split(" | ")[0].strip())
            tables.append((base, cells))
    return tables


def _split_top_level(text: str) -> list[str]:
    parts, depth, current, quote = [], 0, "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def _entries() -> list[tuple[str, str, str | None]]:
    """(base, dotted name, argument text or None) of every backticked name in the tables."""
    out = []
    for base, cells in _tables():
        for cell in cells:
            for span in re.findall(r"`([^`]+)`", cell):
                m = re.match(r"^([A-Za-z_][\w.]*)(?:\((.*)\))?$", span, re.S)
                if m:
                    out.append((base, m.group(1), m.group(2)))
    return out


def _resolve(base: str, dotted: str):
    obj = importlib.import_module(base)
    for i, part in enumerate(dotted.split(".")):
        if not hasattr(obj, part):
            obj = importlib.import_module(".".join([obj.__name__] + dotted.split(".")[i:i + 1]))
        else:
            obj = getattr(obj, part)
    return obj


ENTRIES = _entries()


def test_the_readme_tables_were_read():
    names = {name for _, name, _ in ENTRIES}
    assert len(ENTRIES) > 60
    assert {"top_eigenpairs", "Analyzer", "at_steps", "checkpoints.run_checkpoints"} <= names


@pytest.mark.parametrize("base,name,args", ENTRIES, ids=[n for _, n, _ in ENTRIES])
def test_every_readme_api_name_exists_with_that_signature(base, name, args):
    obj = _resolve(base, name)
    if args is None or args.strip() in ("", "...") or not callable(obj):
        assert args is None or args.strip() in ("", "...") or callable(obj), name
        if args == "" and callable(obj):  # `f()`: no required parameter
            required = [p for p in inspect.signature(obj).parameters.values()
                        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                               p.POSITIONAL_OR_KEYWORD,
                                                               p.KEYWORD_ONLY)]
            assert not required, f"{name}() leaves out {[p.name for p in required]}"
        return
    params = inspect.signature(obj).parameters
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY,
                                                              p.POSITIONAL_OR_KEYWORD)]
    shown, keyword_only = [], False
    for i, arg in enumerate(_split_top_level(args)):
        try:  # an example value in a call (`parse_mesh("data:4,model:2")`): positional
            ast.literal_eval(arg)
        except (ValueError, SyntaxError):
            pass
        else:
            assert not keyword_only and i < len(positional), (name, arg)
            shown.append(positional[i])
            continue
        if arg == "*":
            keyword_only = True
            continue
        if arg.startswith("**"):
            assert any(p.kind == p.VAR_KEYWORD for p in params.values()), (name, arg)
            continue
        if arg.startswith("*"):
            assert any(p.kind == p.VAR_POSITIONAL for p in params.values()), (name, arg)
            keyword_only = True
            continue
        arg_name, _, default = arg.partition("=")
        arg_name = arg_name.strip()
        assert arg_name in params, f"{name}: the README shows {arg_name!r}, the signature " \
                                   f"is {inspect.signature(obj)}"
        p = params[arg_name]
        if keyword_only:
            assert p.kind == p.KEYWORD_ONLY, f"{name}: {arg_name} is not keyword-only"
        else:
            assert p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD), \
                f"{name}: {arg_name} is keyword-only in the code, positional in the README"
        if default:
            try:
                value = ast.literal_eval(default.strip())
            except ValueError:
                value = p.default  # an expression the README names, not a literal
            assert p.default == value, f"{name}: {arg_name} defaults to {p.default!r}, the " \
                                       f"README says {default.strip()}"
        shown.append(arg_name)
    required = [p.name for p in params.values() if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [n for n in required if n not in shown]
    assert not missing, f"{name}: required {missing} not in the README row"


# --------------------------------------------------------------------------------------------
# Conventions.


def _problem():
    """A plain-function model with a two-leaf pytree of parameters (no flax)."""
    kx, kw = jax.random.split(jax.random.key(0))
    data = {"x": jax.random.normal(kx, (40, 3)), "y": jnp.arange(40) % 2}
    params = {"w": jax.random.normal(kw, (3, 2)) * 0.5, "b": jnp.zeros(2)}

    def loss(p, batch):
        logits = batch["x"] @ p["w"] + p["b"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), batch["y"]])

    return params, data, loss


def test_results_are_named_tuples():
    a = jnp.diag(jnp.arange(1.0, 7.0))
    res = hs.lanczos(lambda v: a @ v, jnp.ones(6), 4)
    ritz = hs.ritz_values(res)
    assert isinstance(ritz, hs.RitzValues) and ritz.values.shape == (4,)
    theta, valid = ritz
    assert bool(valid.all()) and theta is ritz.values
    rule = hs.krylov.gauss_quadrature(res)
    assert isinstance(rule, hs.Quadrature)
    np.testing.assert_allclose(float(rule.weights.sum()), 1.0, rtol=1e-5)
    slq = hs.slq_quadrature(lambda v: a @ v, jax.random.key(1), num_probes=3, num_steps=4,
                            like=jnp.zeros(6))
    assert isinstance(slq, hs.Quadrature) and slq.nodes.shape == (3, 4)
    trace = hs.hutchinson_trace(lambda v: a @ v, jax.random.key(2), num_probes=4,
                                like=jnp.zeros(6))
    assert isinstance(trace, hs.TraceEstimate)
    assert float(trace.estimate) == pytest.approx(21.0)  # Rademacher probes: z^T D z = Tr D
    assert float(trace.standard_error) == pytest.approx(0.0, abs=1e-6)


def test_operator_argument_is_matvec_everywhere():
    for fn in (hs.lanczos, hs.top_eigenpairs, hs.track_eigenpairs, hs.spectral_density,
               hs.slq_quadrature, hs.hutchinson_trace, hs.restrict, hs.precondition,
               hs.dense_matrix):
        assert next(iter(inspect.signature(fn).parameters)) == "matvec", fn.__name__
    params, data, loss = _problem()
    op = hs.dataset_hvp(loss, params, data, batch_size=40)
    block = hs.restrict(matvec=op, subset="w")
    assert block.dim == 6
    scaled = hs.precondition(matvec=op, scale=jax.tree_util.tree_map(jnp.ones_like, params))
    v = hs.random_start_vector(jax.random.key(3), params)
    for a, b in zip(jax.tree_util.tree_leaves(scaled(v)), jax.tree_util.tree_leaves(op(v)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_start_vectors_are_pytrees_or_flat_alike():
    params, data, loss = _problem()
    op = hs.dataset_hvp(loss, params, data, batch_size=40)
    v0 = hs.random_start_vector(jax.random.key(4), params)
    flat = jax.flatten_util.ravel_pytree(v0)[0]
    tree_res = hs.top_eigenpairs(op, v0, 2, tol=1e-4)
    flat_res = hs.top_eigenpairs(op, flat, 2, tol=1e-4)
    np.testing.assert_array_equal(tree_res.eigenvalues, flat_res.eigenvalues)
    np.testing.assert_array_equal(tree_res.eigenvectors, flat_res.eigenvectors)
    lanczos_tree = hs.lanczos(op, v0, 5)
    np.testing.assert_array_equal(hs.lanczos(op, flat, 5).alphas, lanczos_tree.alphas)
    # Tracking from earlier eigenvectors: as (k, p) rows or as stacked pytrees (as_pytrees).
    rows = tree_res.eigenvectors
    stacked = hs.as_pytrees(rows, params)
    from_rows = hs.track_eigenpairs(op, rows, 2, like=params, tol=1e-4, max_blocks=3)
    from_tree = hs.track_eigenpairs(op, stacked, 2, like=params, tol=1e-4, max_blocks=3)
    np.testing.assert_array_equal(from_rows.eigenvalues, from_tree.eigenvalues)
    from_list = hs.track_eigenpairs(op, list(rows), 2, like=params, tol=1e-4, max_blocks=3)
    np.testing.assert_array_equal(from_rows.eigenvalues, from_list.eigenvalues)
    # A flat vector of the wrong size is still named.
    with pytest.raises(ValueError, match="`v0` must be shaped like the operator's vectors"):
        hs.top_eigenpairs(op, jnp.ones(5), 2)
    with pytest.raises(ValueError, match=r"`start` must be \(b, 8\) rows or a pytree"):
        hs.track_eigenpairs(op, flat, 2, like=params)


@pytest.mark.parametrize("args", ["matvec, v0, *, k",  # k is positional in the code
                                  "matvec, v0, k, *, tol=1e-3",  # the default is None
                                  "matvec, v0",  # k is required and left out
                                  "operator, v0, k"])  # no such parameter
def test_the_signature_check_catches_a_wrong_row(args):
    with pytest.raises(AssertionError):
        test_every_readme_api_name_exists_with_that_signature("hessian_subspace",
                                                              "top_eigenpairs", args)
