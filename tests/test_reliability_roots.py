"""Table roots that would not outlive the process are refused before any work (issue 12, item 1)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from fleetprune.cli import main
from fleetprune.errors import TableError
from fleetprune.tables import TableStore


def test_profile_refuses_an_in_memory_root_with_one_line(capsys):
    argv = ["profile", "resnet20", "--ray-address", "none", "--backend", "fake", "--tables", "mock:///tables"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: the table root mock:///tables is an in-memory filesystem")
    assert "file:///" in err and "local folder" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "measured" not in captured.out  # no summary: nothing claimed saved


@pytest.mark.parametrize("verb", [["tables", "ls"], ["tables", "validate"]])
def test_table_verbs_refuse_an_in_memory_root(verb, capsys):
    assert main([*verb, "--tables", "mock:///t"]) == 2
    assert "in-memory filesystem that vanishes" in capsys.readouterr().err


def test_a_store_on_an_in_memory_uri_is_refused_but_a_shared_mock_filesystem_still_works():
    with pytest.raises(TableError, match="vanishes when this process ends"):
        TableStore("mock:///x")
    mockfs, _ = pafs.FileSystem.from_uri("mock:///")
    store = TableStore("tables", filesystem=mockfs)  # tests share one in-memory filesystem on purpose
    assert not store.exists()
