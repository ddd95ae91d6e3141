"""Scalar writers on their own: what a record becomes as scalars, the CSV file, and the writer
protocol (a callable or clu's ``write_scalars``). The Analyzer's use of them (bookkeeping kept
out, TensorBoard event files read back) is in ``test_store.py``."""

import math

import pytest

from hessian_subspace.analysis import writers


def test_scalars_of_flattens_nested_numbers_and_drops_the_rest():
    record = {"step": 3, "seconds": 1.5, "hvps": 40, "f_top": 0.5, "converged": True,
              "eigenvalues": [3.0, 2.0], "name": "x", "bound": math.inf, "nan": math.nan,
              "subspace_overlap": {"0": {"top1": 0.9, "next": 0.1}, "previous": {"step": 2}},
              "count": 7}
    assert writers.scalars_of(record) == {
        "f_top": 0.5, "subspace_overlap/0/top1": 0.9, "subspace_overlap/0/next": 0.1,
        "count": 7.0}
    assert all(isinstance(v, float) for v in writers.scalars_of(record).values())


def test_summary_names_the_headline_numbers():
    line = writers.summary({"train_loss": 0.123456, "f_top": 0.9, "lambda_max": None})
    assert line == "train_loss 0.1235  f_top 0.9"


def test_csv_writer_appends_and_the_last_row_of_a_step_wins(tmp_path):
    path = tmp_path / "sub" / "scalars.csv"
    w = writers.CSVWriter(str(path))
    w.write_scalars(0, {"f_top": 0.25, "a/b": 1.0})
    w.write_scalars(5, {"f_top": 0.5})
    w.write_scalars(0, {"f_top": 0.75})  # step 0 analysed again
    # A second writer on the same file appends without a second header.
    writers.CSVWriter(str(path)).write_scalars(9, {"f_top": 1.0})
    assert path.read_text().splitlines()[0] == "step,name,value"
    assert path.read_text().count("step,name,value") == 1
    assert writers.read_csv(str(path)) == {"f_top": {0: 0.75, 5: 0.5, 9: 1.0},
                                           "a/b": {0: 1.0}}
    # Values round-trip exactly (repr of the float).
    w.write_scalars(11, {"x": 0.1 + 0.2})
    assert writers.read_csv(str(path))["x"][11] == 0.1 + 0.2


def test_any_callable_or_clu_style_writer_is_a_writer():
    calls = []

    class CluLike:  # clu.metric_writers' protocol
        def write_scalars(self, step, scalars):
            calls.append(("clu", step, dict(scalars)))

        def flush(self):
            calls.append(("flush",))

    for target in (CluLike(), lambda step, scalars: calls.append(("fn", step, scalars))):
        w = writers.as_writer(target)
        w.write(4, {"f_top": 0.5})
        w.flush()
    assert calls == [("clu", 4, {"f_top": 0.5}), ("flush",), ("fn", 4, {"f_top": 0.5})]
    for bad in (42, "scalars.csv", None):
        with pytest.raises(TypeError, match="a writer must be callable"):
            writers.as_writer(bad)
