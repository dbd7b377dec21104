"""scripts/sweep_report.py and scripts/plot_run.py on a tiny real sweep (train.py -m on digits)."""

import json
import runpy
import shutil
import statistics
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def script(name, *args, capsys):
    """Run ``scripts/<name>`` in this process (as ``python scripts/<name> args``): its exit status and output."""
    argv, sys.argv = sys.argv, [name, *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(ROOT / "scripts" / name), run_name="__main__")
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=exited.value.code, stdout=out, stderr=err)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """One train.py -m sweep of 3 methods × 2 seeds, 1 epoch each; its dense jobs moved to a folder of their own."""
    root = tmp_path_factory.mktemp("sweeps")
    done = run_cli(
        "train.py",
        "-m",
        "sparsity.method=spartan,magnitude,dense",
        "seed=0,1",
        "logger=none",
        "schedule.epochs=1",
        f"hydra.sweep.dir={root / 'sparse'}",
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "dense").mkdir()
    for job in (root / "sparse").glob("*sparsity.method=dense*"):
        job.rename(root / "dense" / job.name)
    return root


def summaries(sweep_dir, method):
    found = []
    for job in sorted(sweep_dir.iterdir()):
        if f"sparsity.method={method}" in job.name:
            found.append(json.loads((job / "summary.json").read_text()))
    return found


def test_sweep_report_tables_every_cell_with_mean_and_std_over_seeds(sweeps, tmp_path, capsys):
    out = tmp_path / "report"
    done = script("sweep_report.py", sweeps / "sparse", sweeps / "dense", "--out", out, capsys=capsys)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "report.md").read_text().splitlines()
    assert table[0].startswith("| method | runs | val top-1 (%) | test top-1 (%) | sparsity, all |")
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert set(rows) == {"spartan", "magnitude", "dense"}
    for method in ("spartan", "magnitude"):
        top1 = [100 * s["val_top1"] for s in summaries(sweeps / "sparse", method)]
        assert len(top1) == 2
        assert f"| 2/2 | {statistics.fmean(top1):.2f} ± {statistics.stdev(top1):.2f} |" in rows[method]
        assert "| 0.9000 ± 0.0000 |" in rows[method]  # exact sparsity over all parameters
    assert "| 2/2 |" in rows["dense"] and "| — |" in rows["dense"]  # digits has no test split
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG
    cells = json.loads((tmp_path / "report.json").read_text())
    assert sorted(len(c["runs"]) for c in cells) == [2, 2, 2]


def test_sweep_report_counts_unfinished_and_collapsed_runs(sweeps, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(sweeps / "sparse", sweep)
    jobs = sorted(p for p in sweep.iterdir() if "sparsity.method=spartan" in p.name)
    (jobs[0] / "summary.json").unlink()  # killed before it finished
    summary = json.loads((jobs[1] / "summary.json").read_text())
    summary["degenerate"] = {"empty_layers": ["0.weight"]}
    (jobs[1] / "summary.json").write_text(json.dumps(summary))
    done = script("sweep_report.py", sweep, "--no-plot", capsys=capsys)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| spartan")]
    assert "| 1/2 |" in row and row.split(" | ")[-2] == "1"  # one run finished, one collapsed
    assert not (sweep / "report.png").exists()


def test_sweep_report_rejects_a_folder_without_runs(tmp_path, capsys):
    done = script("sweep_report.py", tmp_path, capsys=capsys)
    assert done.returncode == 2 and "no train.py run directories" in done.stderr


def test_plot_run_draws_every_panel_that_has_data(sweeps, tmp_path, capsys):
    spartan = next(p for p in sorted((sweeps / "sparse").iterdir()) if "sparsity.method=spartan" in p.name)
    done = script("plot_run.py", spartan, "--out", tmp_path / "sparse", capsys=capsys)
    assert done.returncode == 0, done.stderr[-3000:]
    names = {"loss.png", "top1.png", "lr.png", "density.png", "mask.png", "layers.png"}
    assert {p.name for p in (tmp_path / "sparse").iterdir()} == names
    assert all((tmp_path / "sparse" / n).read_bytes()[:8] == PNG for n in names)
    dense = sorted((sweeps / "dense").iterdir())[0]
    done = script("plot_run.py", dense, capsys=capsys)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in (dense / "plots").iterdir()} == {"loss.png", "top1.png", "lr.png", "layers.png"}
    missing = script("plot_run.py", tmp_path / "nothing", capsys=capsys)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr


def test_sweep_report_where_selects_jobs_by_config_value(sweeps, tmp_path, capsys):
    done = script(
        "sweep_report.py",
        sweeps / "sparse",
        "--where",
        "sparsity.method=magnitude",
        "--no-plot",
        "--out",
        tmp_path / "r",
        capsys=capsys,
    )
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "r.md").read_text().splitlines()
    assert table[0].startswith("| runs |") and len(table) == 3 and table[2].startswith("| 2/2 |")
    for bad, message in (
        ("sparsity.method", "KEY=VALUE"),
        ("nokey=1", "no job has a config key"),
        ("seed=9", "no job matches"),
    ):
        done = script("sweep_report.py", sweeps / "sparse", "--where", bad, capsys=capsys)
        assert done.returncode == 2 and message in done.stderr
