"""Every committed results table is what `results/render.sh` renders from committed files: none is typed by hand."""

from pathlib import Path

import pytest

from cluster.report import render

RESULTS = Path(__file__).resolve().parents[1] / "results"
SETS = sorted(p.parent for p in RESULTS.glob("*/runs.txt"))


def test_every_report_has_a_run_list():
    reports = sorted(p.parent for p in RESULTS.glob("*/report.md"))
    assert reports and reports == SETS, "each results/<set>/report.md needs a runs.txt naming its runs (render.sh)"


@pytest.mark.parametrize("set_dir", SETS, ids=[s.name for s in SETS])
def test_committed_report_is_rendered_from_committed_runs(set_dir: Path, monkeypatch):
    runs = (set_dir / "runs.txt").read_text().split()
    monkeypatch.chdir(set_dir)  # runs.txt paths are relative to the set, as render.sh runs them
    for run in runs:
        assert (Path(run) / "eval" / "results.json").is_file(), f"{set_dir.name}: {run} has no committed eval rows"
    text, _ = render(runs, Path("."))
    assert text == (set_dir / "report.md").read_text(), (
        f"results/{set_dir.name}/report.md differs from what its runs render: run results/render.sh {set_dir.name}")


STARTS = [  # (the config that names it, the committed checkpoint)
    ("twx-short.yaml", RESULTS / "twxs-valid" / "twxs-sft-n25-20261205-013807" / "checkpoints" / "sft"),
    ("twx-short.yaml", RESULTS / "twxs-retroformer" / "twxs-sft-refl6-20261205-185635" / "checkpoints" / "sft"),
    ("sciworld-short.yaml", RESULTS / "sws-valid" / "sws-sft-b2k-20261206-152034" / "checkpoints" / "sft"),
    ("sciworld-short.yaml", RESULTS / "sws-retroformer" / "sws-sft-refl6-20261207-065506" / "checkpoints" / "sft"),
]


@pytest.mark.parametrize("config_name, start", STARTS, ids=[s.parent.parent.name for _, s in STARTS])
def test_committed_starting_checkpoint_fits_the_config_it_is_named_in(config_name, start):
    """The checkpoints issue 22's method runs start from are committed whole, and still pass the start check (same
    base model by its weights, LoRA shape, adapter layout) for the config that names them: a changed LoRA default
    would strand them."""
    from agents.model import resolve_model
    from cluster.checks import check_checkpoint, meta_model
    from cluster.config import load_config

    config = RESULTS.parent / "configs" / config_name
    assert str(start.relative_to(RESULTS.parent)) in config.read_text()
    cfg = load_config(config, [f"init.checkpoint={start}"])
    model_path = str(resolve_model(cfg.model.path, cfg.model.cache_dir))
    check_checkpoint(cfg, model_path, meta_model(cfg, model_path))  # raises ConfigError naming what differs
