"""A site says what is wrong with its own table, in its own log, in one line: a schema mismatch
by its own column names, a bad value with the file and its line; the server gets no name."""

from __future__ import annotations

import logging

import pytest

import fedvi
from fedvi.data import DataError
from fedvi.io import DataFileError, locate_error, open_table
from fedvi.protocol import variable_hashes
from fedvi.simulate import simulate
from fedvi.site import encode_site
from fedvi.site_messages import SchemaMismatch, check_schema, failure_line, schema_mismatch

AGREED = ["age", "sex", "smoker", "bmi"]


def test_a_renamed_column_is_named_by_the_sites_own_name_and_position():
    text = schema_mismatch(["age", "sex", "smoking", "bmi"], variable_hashes(AGREED))
    assert "renamed: 'smoking' (#3)" in text
    assert "extra" not in text and "missing" not in text
    assert "smoker" not in text  # the site never learns the agreed name


def test_extra_and_missing_columns_are_told_apart_from_renamed_ones():
    text = schema_mismatch(["age", "sex", "bmi", "site_code"], variable_hashes(AGREED))
    # position 3 holds 'bmi' (agreed), so 'site_code' (#4) is extra, agreed #3 missing
    assert "extra: 'site_code' (#4)" in text and "missing: the agreed variables #[3]" in text
    assert "renamed" not in text
    text = schema_mismatch(["age", "sex", "smoker", "bmi", "zip"], variable_hashes(AGREED))
    assert "extra: 'zip' (#5)" in text and "missing" not in text


def test_the_same_variables_in_another_order_are_no_mismatch():
    assert schema_mismatch(["bmi", "age", "smoker", "sex"], variable_hashes(AGREED)) is None
    check_schema(["bmi", "age", "smoker", "sex"], variable_hashes(AGREED))


def test_the_server_gets_counts_the_log_gets_names():
    with pytest.raises(SchemaMismatch) as err:
        check_schema(["age", "sex", "smoking", "bmi", "zip"], variable_hashes(AGREED))
    assert "smoking" not in str(err.value) and "zip" not in str(err.value)
    assert "1 renamed, 1 extra, 0 missing" in str(err.value)
    line = failure_line("site 1", "local", err.value)
    assert "'smoking' (#3)" in line and "'zip' (#5)" in line and "\n" not in line


def _csv_with(tmp_path, old: str, new: str):
    sim = simulate(40, 2, 5, seed=0)
    path = tmp_path / "site.csv"
    fedvi.io.write_table(path, sim.X, feature_names=[f"v{d}" for d in range(5)], labels=sim.z)
    path.write_text(path.read_text().replace(old, new, 1))
    return path


def test_a_bad_value_found_after_reading_names_the_file_and_its_line(tmp_path):
    path = _csv_with(tmp_path, "\n1,", "\n\n7,")  # a blank line before it: line != row + 1
    table = open_table(path, label_column="y")
    with pytest.raises(DataError) as err:
        encode_site(table, fedvi.MixtureSpec(), source="site 0")
    row = err.value.row
    located = locate_error(err.value, path)
    assert isinstance(located, DataFileError) and located.kind == "bad-value"
    text = str(located)
    lines = path.read_text().splitlines()
    line = next(i + 1 for i, s in enumerate(lines) if s.startswith("7,"))
    assert text.startswith(f"{path}, line {line}: ")
    assert f"row {row + 1}," in text and "'v0'" in text and "value 7" in text
    assert line == row + 3  # header, the blank line, then data row row + 1


def test_an_error_that_names_its_file_is_kept(tmp_path):
    path = _csv_with(tmp_path, "\n1,", "\nyes,")
    with pytest.raises(DataFileError) as err:
        open_table(path, label_column="y")
    assert locate_error(err.value, path) is err.value


@pytest.fixture
def flwr_log():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    h = Keep()
    logger = logging.getLogger("flwr")
    logger.addHandler(h)
    yield records
    logger.removeHandler(h)


def _ask(client, phase, **kw):
    from fedvi.protocol import encode_request

    arrays, config = encode_request(
        phase, fedvi.MixtureSpec(), fedvi.FitOptions(), fedvi.ServerOptions(), 0, **kw
    )
    return client.fit(arrays, config)


def test_the_site_logs_a_renamed_column_in_one_line_and_sends_no_name(tmp_path, flwr_log):
    pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")
    from fedvi.flower.client import FedviClient
    from fedvi.protocol import SiteError

    path = _csv_with(tmp_path, "v3", "v3_new")
    out = tmp_path / "out"
    client = FedviClient({"partition-id": 1, "data-path": str(path), "output-dir": str(out)})
    agreed = variable_hashes([f"v{d}" for d in range(5)])
    with pytest.raises(SiteError) as err:
        _ask(client, "local", variable_order=agreed)
    assert "v3_new" not in str(err.value) and "schema" in str(err.value)
    (rec,) = [r for r in flwr_log if "failed" in r.getMessage()]
    assert "renamed: 'v3_new' (#4)" in rec.getMessage() and rec.exc_info is None
    assert "renamed: 'v3_new' (#4)" in (out / "fedvi_site1.log").read_text()
    assert "Traceback" not in (out / "fedvi_site1.log").read_text()


def test_the_site_logs_a_bad_value_with_file_and_line_and_no_traceback(tmp_path, flwr_log):
    pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")
    from fedvi.flower.client import FedviClient
    from fedvi.protocol import SiteError

    path = _csv_with(tmp_path, "\n1,", "\n7,")
    client = FedviClient({"partition-id": 2, "data-path": str(path)})
    with pytest.raises(SiteError) as err:
        _ask(client, "preflight")
    assert str(path) not in str(err.value) and "bad-value" in str(err.value)
    (rec,) = [r for r in flwr_log if "failed" in r.getMessage()]
    msg = rec.getMessage()
    line = next(i + 1 for i, s in enumerate(path.read_text().splitlines()) if s.startswith("7,"))
    assert f"{path}, line {line}:" in msg and f"row {line - 1}," in msg and "value 7" in msg
    assert rec.exc_info is None and "\n" not in msg


def test_an_unexpected_error_keeps_its_traceback_in_the_log_file(tmp_path, flwr_log, monkeypatch):
    pytest.importorskip("flwr", reason="the Flower layer: pip install -e .[app]")
    from fedvi import site_agent
    from fedvi.flower import client as site
    from fedvi.protocol import SiteError

    path = _csv_with(tmp_path, "v3", "v3")
    out = tmp_path / "out"

    def boom(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(site_agent, "encode_site", boom)
    client = site.FedviClient({"partition-id": 0, "data-path": str(path), "output-dir": str(out)})
    with pytest.raises(SiteError, match="internal error"):
        _ask(client, "preflight")
    (rec,) = [r for r in flwr_log if "failed" in r.getMessage()]
    assert rec.exc_info is not None and "unexpected error (ZeroDivisionError)" in rec.getMessage()
    assert "Traceback" in (out / "fedvi_site0.log").read_text()
