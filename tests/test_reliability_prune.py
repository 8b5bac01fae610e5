"""Issue 12, the prune and validate side: nothing a user does loses work or hands back a broken result.

Each test fails on the code before the fix: an --out that cannot be written failed only after the
whole prune; a validate on a root that cannot be written lost every measurement; weights that make
scores NaN gave a variant with every group at its narrowest and exit 0; a missing-rows hint for a
non-default input size printed a command that measured nothing; a killed write left its temporary
folder forever; two identical prunes without --weights gave different weights.
"""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fleetprune.api import prune
from fleetprune.cli import main
from fleetprune.errors import FleetpruneError, ModelError, TableError
from fleetprune.pruner.variant import remove_stale

from prune_tables import fake_tables


def _immutable(path: Path) -> bool:
    """Make ``path`` unwritable even for root (chattr +i); False where the filesystem cannot."""
    return shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(path)],
                                                                   capture_output=True).returncode == 0


def _mutable(path: Path) -> None:
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_an_out_folder_that_cannot_be_written_fails_before_any_work(tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    if not _immutable(blocked):
        pytest.skip("chattr +i is not available on this filesystem")
    calls = []
    verb = importlib.import_module("fleetprune.api.prune")  # the module; the package re-exports the verb
    monkeypatch.setattr(verb, "prune_for_device", lambda *a, **k: calls.append(1))
    try:
        rc = main(["prune", "resnet20", "--tables", fake_tables(), "--device", "all", "--budget", "0.7",
                   "--steps", "1", "--out", str(blocked / "variants")])
    finally:
        _mutable(blocked)
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be written" in err and "Traceback" not in err
    assert calls == []  # refused before anything was pruned


def test_an_out_path_under_a_file_is_refused_up_front(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FleetpruneError, match="cannot be written"):
        prune("resnet20", tables=fake_tables(), devices="all", budget=0.7, steps=1, out=f / "variants")


def test_scores_that_are_not_finite_are_refused_with_the_groups(tmp_path):
    """Weights with a NaN reach the pruner through a factory (past the checkpoint checks)."""
    from fleetprune import models

    def factory():
        torch.manual_seed(0)
        net = models.create("resnet20")
        with torch.no_grad():
            net.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
        return net

    with pytest.raises(ModelError, match=r"NaN or infinite values in 1 tensor\(s\): layer2.0.conv1.weight"):
        prune("resnet20-nan", tables=fake_tables(), devices="all", budget=0.7, steps=1, out=tmp_path / "v",
              model_factory=factory, input_shape=(3, 32, 32), round_to=8)
    assert not (tmp_path / "v").exists() or not any((tmp_path / "v").iterdir())


def test_the_missing_rows_hint_measures_what_was_missing(tmp_path, capsys):
    """The printed profile command carries the input size (and every option that shaped the plan):
    running it and then the prune again succeeds."""
    root = str(tmp_path / "tables")
    base = ["--round-to", "16", "--max-choices", "2"]
    assert main(["profile", "resnet20", "--tables", root, "--threads", "1", "--ray-address", "none", "--quick",
                 "--batch", "2", *base]) == 0
    capsys.readouterr()
    prune_args = ["prune", "resnet20", "--tables", root, "--device", "all", "--budget", "1.0", "--steps", "1",
                  "--input-size", "16", "--no-measure", "--no-report", *base, "--out", str(tmp_path / "v")]
    assert main(prune_args) == 2
    err = capsys.readouterr().err
    [command] = [ln.strip() for ln in err.splitlines() if ln.strip().startswith("fleetprune profile")]
    for flag in ("--input-size 16", "--round-to 16", "--max-choices 2", "--batch 2", "--dtype fp32",
                 "--memory-format nhwc"):
        assert flag in command
    argv = shlex.split(command)[1:] + ["--threads", "1", "--ray-address", "none", "--quick"]
    assert main(argv) == 0
    assert main(prune_args) == 0


def test_a_validate_root_that_cannot_be_written_is_refused_before_measuring(tmp_path, monkeypatch):
    vmod = importlib.import_module("fleetprune.api.validate")
    from fleetprune.profiler import TimingProtocol, TorchTimingBackend, cpu_device, profile_configs, provenance
    from fleetprune.tables import TableStore

    from test_validate import SHAPE, Tiny, tiny_plan

    device, protocol = cpu_device(1), TimingProtocol.quick()
    root = tmp_path / "tables"
    TableStore(root).write(device.key, list(profile_configs(tiny_plan().configs(), TorchTimingBackend(device, protocol))),
                           provenance(device, protocol))
    calls = []
    monkeypatch.setattr(vmod, "measure_model", lambda *a, **k: calls.append(1))
    if not _immutable(root):
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        with pytest.raises(TableError, match="cannot be written"):
            vmod.validate("tiny", str(root), device.key, variants=2, model_factory=Tiny, input_shape=SHAPE)
    finally:
        _mutable(root)
    assert calls == []


def test_a_temporary_folder_left_by_a_killed_write_is_removed_by_the_next(tmp_path):
    out = tmp_path / "v"
    out.mkdir()
    stale = out / f".cpu-x.{'a' * 32}.tmp"
    fresh = out / f".cpu-y.{'b' * 32}.tmp"
    other = out / ".not-ours"
    for p in (stale, fresh, other):
        p.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    assert remove_stale(out) == [stale]
    assert not stale.exists() and fresh.exists() and other.exists()  # a running write and foreign names stay
    os.utime(fresh, (old, old))
    prune("resnet20", tables=fake_tables(), devices="fake-compute", budget=0.7, steps=1, out=out, overwrite=True)
    assert not fresh.exists() and other.exists()


def test_same_inputs_same_weights_and_the_seed_is_recorded(tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        [r] = prune("resnet20", tables=fake_tables(), devices="fake-compute", budget=0.7, steps=1,
                    out=tmp_path / name, seed=seed)
        runs.append((r, torch.load(r.folder / "weights.pt", weights_only=True)))
    (a, wa), (b, wb), (c, wc) = runs
    assert a.widths == b.widths and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k not in wc or wa[k].shape != wc[k].shape or not torch.equal(wa[k], wc[k]) for k in wa)
    assert a.report["seed"] == 0 and c.report["seed"] == 1
