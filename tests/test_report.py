"""`retrorl report`: run directories written from real `evaluate()` rows of hand-built episodes; no Ray, no model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from agents.trajectory import ACTOR, REFLECTOR, Episode, Generation, Step, Trial
from cluster import cli
from cluster.evaluation import evaluate, padded_returns, summarise
from cluster.stats import success_diff

K = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _generation(role: str, text: str) -> Generation:
    return Generation(role=role, prompt_ids=[1, 2], completion_ids=[3], logprobs=[-0.5], version=0, text=text)


def _episode(task: str, split: str, trials: list[tuple[float, int]]) -> Episode:
    """trials: (return, steps) per trial; a return of 1.0 is a win and must be the last trial (episodes stop there).
    Every trial but the last gets a reflection, as the rollout writes one after each failed trial with trials left."""
    built = []
    for i, (ret, n_steps) in enumerate(trials):
        steps = [Step(observation="obs", action="look", thought="t", reward=0.0, score=0.0, valid=True,
                      format_ok=j != 0, generation=_generation(ACTOR, "Action: look")) for j in range(n_steps)]
        last = i == len(trials) - 1
        built.append(Trial(index=i, memory=[], steps=steps, ret=ret, success=ret >= 1.0, format_errors=1,
                           reflection=None if last else _generation(REFLECTOR, "try the key")))
    return Episode(episode_id=f"{task}-{split}", env="textworld", task_id=task, split=split, source="rollout",
                   trials=built)


# run A: a win at trial 1 (stops), a win at trial 3 after two reflections, partial returns, a win at trial 2
EPISODES_A = [
    _episode("a1", "seen", [(1.0, 4)]),
    _episode("a2", "seen", [(0.0, 6), (0.5, 5), (1.0, 3)]),
    _episode("a3", "unseen", [(0.2, 8), (0.2, 8), (0.4, 7)]),
    _episode("a4", "unseen", [(0.0, 9), (1.0, 2)]),
]
EPISODES_B = [
    _episode("b1", "seen", [(0.5, 5), (0.25, 5), (0.75, 5)]),
    _episode("b2", "seen", [(0.0, 10), (0.0, 10), (0.0, 10)]),
    _episode("b3", "unseen", [(0.6, 4), (1.0, 3)]),
]
ROUNDS_B = [(1, 0.1), (2, 0.35), (3, 0.5)]


def _write_run(path: Path, method: str, seed: int, episodes: list[Episode], label: str,
               rounds: list[tuple[int, float]], learners: tuple[tuple[str, str], ...] = (), trials: int = K,
               config: dict | None = None) -> list[dict]:
    rows = evaluate(episodes, label, trials)
    (path / "eval").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "method": method, "name": path.name,
                                                      **(config or {})}))
    (path / "eval" / "results.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
    lines = [json.dumps({"event": "learner", "dtype": dtype, "cpu_capability": cpu, "cpu": "test"})
             for dtype, cpu in learners]
    lines.append(json.dumps({"event": "demos", "tasks": 4}))
    for r, ret in rounds:
        lines.append(json.dumps({"event": "round", "method": method, "round": r, "train_return": ret,
                                 "first_return": ret / 2, "final_return": ret, "success": 0.0}))
        lines.append(json.dumps({"event": "eval", "label": f"{label} r{r}", "round": r, "rows": rows}))
    lines.append('{"event": "round", "method": "ret')  # cut by a crash mid-write: skipped
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return rows


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    run_a, run_b = tmp_path / "sft-20260101-000000", tmp_path / "retroact-20260101-000000"
    _write_run(run_a, "sft", 0, EPISODES_A, "SFT", [])
    # run B started on one machine and was resumed twice on another (the same learner logged twice)
    _write_run(run_b, "retroact", 7, EPISODES_B, "RetroAct", ROUNDS_B,
               (("bfloat16", "AVX512"), ("float32", "AVX2"), ("float32", "AVX2")))
    return run_a, run_b


@pytest.fixture(autouse=True)
def _no_config(monkeypatch):
    """`report` must not load a config (nor run preflight, a model or Ray)."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("report loaded a config")
    monkeypatch.setattr(cli, "load_config", refuse)


def _table(md: str, index: int = 0) -> list[dict[str, str]]:
    """The rows of the md's `index`-th table (a block of consecutive "|" lines)."""
    blocks, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    lines = blocks[index]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def _expected(episodes: list[Episode], split: str, trials: int) -> dict[str, str]:
    """Computed from the episodes here, independently of summarise(), over the first `trials` trials: a one-trial
    (ReAct) row has its own steps and no reflections ("-")."""
    eps = [e for e in episodes if e.split == split]
    padded = []
    for e in eps:
        rets = [t.ret for t in e.trials][:trials]
        padded.append(rets + [rets[-1]] * (trials - len(rets)))
    n = len(eps)
    steps = sum(len(t.steps) for e in eps for t in e.trials[:trials])
    pairs = [(t.ret, e.trials[i + 1].ret) for e in eps for i, t in enumerate(e.trials[:trials][:-1])]

    def x100(v: float) -> str:
        return f"{100 * v:.1f}"

    return {
        "episodes": str(n), "trials": str(trials),
        "IR": x100(sum(p[0] for p in padded) / n),
        "FR": x100(sum(p[-1] for p in padded) / n),
        "AR": x100(sum(sum(p) / trials for p in padded) / n),
        "success": x100(sum(any(t.ret >= 1.0 for t in e.trials[:trials]) for e in eps) / n),
        "avg_steps": f"{steps / sum(len(e.trials[:trials]) for e in eps):.1f}",
        "reflection_improved": x100(sum(b > a for a, b in pairs) / len(pairs)) if pairs else "-",
    }


def test_returns_per_trial_pads_after_a_win():
    win_first = EPISODES_A[0]  # one trial, won: the two trials it skipped count as that win
    assert padded_returns(win_first, K) == [1.0, 1.0, 1.0]
    assert summarise([win_first], K)["returns_per_trial"] == [1.0, 1.0, 1.0]
    win_second = EPISODES_A[3]
    assert summarise([win_second], K)["returns_per_trial"] == [0.0, 1.0, 1.0]
    both = summarise([EPISODES_A[2], win_second], K)
    assert both["returns_per_trial"] == pytest.approx([0.1, 0.6, 0.7])
    assert both["returns_per_trial"][0] == pytest.approx(both["IR"])
    assert both["returns_per_trial"][-1] == pytest.approx(both["FR"])
    assert sum(both["returns_per_trial"]) / K == pytest.approx(both["AR"])
    assert summarise([win_second], 1)["returns_per_trial"] == [0.0]


def test_report_table_and_plot(runs, tmp_path, capsys):
    run_a, run_b = runs
    results = {run.name: json.loads((run / "eval" / "results.json").read_text()) for run in runs}
    out = tmp_path / "out"
    assert cli.main(["report", str(run_a), str(run_b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert md in printed

    # the run list says where each run is, relative to the report (a committed report reads the same on every
    # checkout), and where its learner trained, once per distinct machine (an eval-only run: nothing)
    assert f"- `{run_a.name}`: ../{run_a.name} (method sft, seed 0)\n" in md
    assert (f"- `{run_b.name}`: ../{run_b.name} (method retroact, seed 7, learner bfloat16 on AVX512, "
            "learner float32 on AVX2)\n") in md

    table = _table(md)
    assert len(table) == 2 * 2 * 2  # runs x labels x splits
    # sorted by split, then by the order the runs were given, then ReAct before + reflection
    assert [(r["split"], r["run"], r["method"]) for r in table] == [
        (split, run.name, f"{label} {kind}")
        for split in ("seen", "unseen")
        for run, label in ((run_a, "SFT"), (run_b, "RetroAct"))
        for kind in ("ReAct", "+ reflection")
    ]
    for row in table:
        run_episodes = EPISODES_A if row["run"] == run_a.name else EPISODES_B
        assert (row["config method"], row["seed"]) == (("sft", "0") if row["run"] == run_a.name else ("retroact", "7"))
        trials = 1 if row["method"].endswith("ReAct") else K
        expected = _expected(run_episodes, row["split"], trials)
        assert {k: row[k] for k in expected} == expected, row
        # and every number is the one evaluate() wrote to results.json, x100 (avg_steps as is)
        source = next(r for r in results[row["run"]] if (r["method"], r["split"]) == (row["method"], row["split"]))
        for key in ("IR", "FR", "AR", "success", "reflection_improved"):
            assert row[key] == ("-" if source[key] is None else f"{100 * source[key]:.1f}")
        assert row["avg_steps"] == f"{source['avg_steps']:.1f}"
    # spot values, by hand: run A seen with reflection: padded [1,1,1] and [0,.5,1]
    seen_a = next(r for r in table if r["run"] == run_a.name and r["split"] == "seen" and "reflection" in r["method"])
    assert (seen_a["IR"], seen_a["FR"], seen_a["AR"], seen_a["success"]) == ("50.0", "100.0", "75.0", "100.0")
    assert "No training rounds in metrics.jsonl: `" + run_a.name + "`" in md
    assert "returns_per_trial" not in md  # every row had its curve: nothing skipped

    png = (out / "report.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000
    from PIL import Image

    with Image.open(out / "report.png") as image:
        image.verify()
    with Image.open(out / "report.png") as image:
        width, height = image.size
        assert width > 800 and height > 300
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # drawn, not blank
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_rows_without_curve_are_skipped_and_named(runs, tmp_path, capsys):
    run_a, _ = runs
    results = run_a / "eval" / "results.json"
    rows = json.loads(results.read_text())
    for row in rows:
        if row["split"] == "unseen":
            del row["returns_per_trial"]  # a results.json written before returns_per_trial existed
    results.write_text(json.dumps(rows))
    assert cli.main(["report", str(run_a)]) == 0
    md = (run_a / "eval" / "report.md").read_text()  # one run: defaults to RUN/eval
    assert (run_a / "eval" / "report.png").read_bytes().startswith(PNG_MAGIC)
    assert "no `returns_per_trial`" in md
    assert f"- `{run_a.name}` / SFT ReAct / unseen" in md and f"- `{run_a.name}` / SFT + reflection / unseen" in md
    assert "/ SFT ReAct / seen" not in md
    assert len(_table(md)) == 4  # still in the table


def test_missing_run_is_exit_2_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    run_a, run_b = runs
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    missing = tmp_path / "no-such-run"
    assert cli.main(["report", str(run_a), str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"retrorl: error: {missing}: no such run directory"]
    assert not out.exists()

    (run_b / "eval" / "results.json").unlink()
    assert cli.main(["report", str(run_a), str(run_b)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"retrorl: error: {run_b}: missing eval/results.json (evaluate the run first)"
    assert cli.main(["report", str(run_b)]) == 2
    capsys.readouterr()
    for run in runs:
        assert not list(run.rglob("report.*"))
    assert not (tmp_path / "report").exists()  # the several-runs default, ./report


def test_game_by_game_against_the_first_run(tmp_path, capsys):
    """Same tasks in both runs: the paired table counts the games each run won that the other did not."""
    base = [_episode("t1", "seen", [(1.0, 3)]), _episode("t2", "seen", [(0.0, 5), (0.0, 5), (0.0, 5)]),
            _episode("t3", "seen", [(0.0, 5), (1.0, 2)]), _episode("t4", "seen", [(0.0, 5), (0.0, 5), (0.0, 5)])]
    other = [_episode("t1", "seen", [(0.0, 5), (0.0, 5), (0.0, 5)]), _episode("t2", "seen", [(1.0, 4)]),
             _episode("t3", "seen", [(0.0, 5), (0.0, 5), (1.0, 2)]), _episode("t4", "seen", [(0.0, 5), (1.0, 2)])]
    run_a, run_b = tmp_path / "sft-1", tmp_path / "eto-1"
    _write_run(run_a, "sft", 0, base, "SFT", [])
    _write_run(run_b, "eto", 0, other, "ETO", [])
    assert cli.main(["report", str(run_a), str(run_b), "--out", str(tmp_path / "out")]) == 0
    md = capsys.readouterr().out
    rows = {r["method"]: r for r in _table(md, 1)}
    assert set(rows) == {"ETO ReAct", "ETO + reflection"}
    # first trial: A won t1; B won t2
    react = rows["ETO ReAct"]
    assert (react["baseline"], react["only run"], react["only baseline"], react["both"], react["tasks"]) == (
        "SFT ReAct", "1", "1", "0", "4")
    # IR differences -1, +1, 0, 0: mean 0, t = 0; McNemar on 1 vs 1 discordant tasks: 2 * 3/4, capped at 1
    assert (react["McNemar p"], react["return diff"], react["paired t p"]) == ("1.000", "+0.0", "1.000")
    low, high = (float(x) for x in react["return 95% CI"].strip("[]").split(","))
    assert -100 <= low < 0 < high <= 100
    # success: one task each way of 4 (none won by both), difference 0, Newcombe's paired interval
    assert react["success diff"] == "+0.0"
    low, high = success_diff(0, 1, 1, 4)[1]
    assert react["success 95% CI"] == f"[{100 * low:+.1f}, {100 * high:+.1f}]" and low < 0 < high
    # three trials: A won t1, t3; B won t2, t3, t4
    full = rows["ETO + reflection"]
    assert (full["baseline"], full["only run"], full["only baseline"], full["both"]) == ("SFT + reflection", "2", "1", "1")
    # FR differences -1, +1, 0, +1: mean 0.25, sd sqrt(2.75 / 3), t = 0.25 / (sd / 2) on 3 df (Student's t CDF
    # with 3 df in closed form, as in tests/test_stats.py)
    t = 0.25 / (math.sqrt(2.75 / 3) / 2)
    p = 2 * (1 - (0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi))
    assert (full["McNemar p"], full["return diff"], full["paired t p"]) == ("1.000", "+25.0", f"{p:.3f}")


def test_rows_stored_before_per_task_outcomes_get_counts_and_mcnemar(tmp_path, capsys):
    """Older committed runs keep only each row's `solved` list: the discordant counts are all McNemar needs, so
    their p is shown; the return columns, which need per-task returns, stay empty."""
    base = [_episode(f"t{i}", "seen", [(0.0, 5)]) for i in range(6)]
    other = [_episode(f"t{i}", "seen", [(1.0 if i < 5 else 0.0, 4)]) for i in range(6)]
    run_a, run_b = tmp_path / "sft-1", tmp_path / "eto-1"
    for path, method, episodes, label in ((run_a, "sft", base, "SFT"), (run_b, "eto", other, "ETO")):
        rows = _write_run(path, method, 0, episodes, label, [], trials=1)
        for row in rows:
            del row["outcomes"]
        (path / "eval" / "results.json").write_text(json.dumps(rows))
    assert cli.main(["report", str(run_a), str(run_b), "--out", str(tmp_path / "out")]) == 0
    react = {r["method"]: r for r in _table(capsys.readouterr().out, 1)}["ETO ReAct"]
    # 5 tasks won only by the run, none only by the baseline: p = 2 * 0.5 ** 5
    assert (react["only run"], react["only baseline"], react["both"], react["McNemar p"]) == ("5", "0", "0", "0.062")
    assert (react["return diff"], react["return 95% CI"], react["paired t p"]) == ("-", "-", "-")
    # the success difference needs only the counts: 5 of 6 tasks won by the run alone
    assert react["success diff"] == "+83.3"
    low, high = success_diff(0, 5, 0, 6)[1]
    assert react["success 95% CI"] == f"[{100 * low:+.1f}, {100 * high:+.1f}]" and 0 < low < high < 1


def test_one_trial_runs_have_one_row_per_split_and_pair_by_kind(tmp_path, capsys):
    """At one trial no reflection is written, so a run has only its ReAct row per split (a "+ reflection" row would
    repeat it); with labels that differ (an eval of RUN/checkpoints/sft is labelled "sft", the SFT run "SFT") it
    still pairs with the baseline's ReAct row, not with its K-trial row."""
    base = [_episode("t1", "seen", [(1.0, 3)]), _episode("t2", "seen", [(0.0, 5), (1.0, 2)])]
    other = [_episode("t1", "seen", [(0.0, 5)]), _episode("t2", "seen", [(1.0, 4)])]
    run_a, run_b = tmp_path / "sft-1", tmp_path / "sft-eval-1"
    assert [r["method"] for r in _write_run(run_a, "sft", 0, base, "SFT", [], trials=2)] == [
        "SFT ReAct", "SFT + reflection"]
    assert [r["method"] for r in _write_run(run_b, "sft", 0, other, "sft", [], trials=1)] == ["sft ReAct"]
    assert cli.main(["report", str(run_a), str(run_b), "--out", str(tmp_path / "out")]) == 0
    rows = {r["method"]: r for r in _table(capsys.readouterr().out, 1)}
    assert {m: r["baseline"] for m, r in rows.items()} == {"sft ReAct": "SFT ReAct"}
    # the baseline's first trial: t1 won only by it, t2 only by the run (the baseline won t2 at its trial 2)
    assert (rows["sft ReAct"]["only run"], rows["sft ReAct"]["only baseline"]) == ("1", "1")


def test_success_per_kind_where_outcomes_name_their_kind(tmp_path, capsys):
    """Episodes tagged with their game kind (the rollout tags each): a table per split counts the tasks won per
    kind, with a column for every kind any run played; a run stored before kinds were tagged has no row there."""
    def tagged(task: str, kind: str, won: bool) -> Episode:
        episode = _episode(task, "valid", [(1.0, 2)] if won else [(0.0, 5)])
        episode.tags["kind"] = kind
        return episode

    base = [tagged("coin-1", "coin", True), tagged("coin-2", "coin", False), tagged("arith-1", "arithmetic", True)]
    other = [tagged("coin-1", "coin", False), tagged("coin-2", "coin", True), tagged("arith-1", "arithmetic", False),
             tagged("sort-1", "sorting", True)]
    runs = [tmp_path / "sft-1", tmp_path / "eto-1", tmp_path / "old-1"]
    _write_run(runs[0], "sft", 0, base, "SFT", [], trials=1)
    _write_run(runs[1], "eto", 0, other, "ETO", [], trials=1)
    _write_run(runs[2], "sft", 0, [_episode("coin-1", "valid", [(1.0, 2)])], "old", [], trials=1)
    assert cli.main(["report", *map(str, runs), "--out", str(tmp_path / "out")]) == 0
    md = capsys.readouterr().out
    assert "Success per kind on `valid` (tasks won / tasks):" in md
    rows = _table(md, 1)
    assert [r["method"] for r in rows] == ["SFT ReAct", "ETO ReAct"]
    assert {k: rows[0][k] for k in ("coin", "arithmetic", "sorting")} == {"coin": "1/2", "arithmetic": "1/1",
                                                                        "sorting": "-"}
    assert {k: rows[1][k] for k in ("coin", "arithmetic", "sorting")} == {"coin": "1/2", "arithmetic": "0/1",
                                                                        "sorting": "1/1"}


@pytest.mark.parametrize("n", [1, 10, 14, 20, 31])
def test_palette_keeps_every_curve_distinct(n):
    from matplotlib.colors import to_rgb

    from cluster.report import palette

    colours = palette(n)
    assert len(colours) == n and len({to_rgb(c) for c in colours}) == n  # the 11th curve no longer reuses C0


def test_across_seeds_mean_and_t_interval(tmp_path, capsys):
    """Three seeds of one method winning 1, 2 and 3 of 4 games: success 25 / 50 / 75, mean 50, sd 25, t interval
    50 -+ t(0.975, 2 df) * 25 / sqrt 3 = 50 -+ 62.1."""
    fail = [(0.0, 5), (0.0, 5), (0.0, 5)]
    paths = []
    for seed in range(3):
        episodes = [_episode(f"t{i}", "seen", [(1.0, 2)] if i <= seed else fail) for i in range(4)]
        paths.append(tmp_path / f"retroact-{seed}")
        _write_run(paths[-1], "retroact", seed, episodes, "RetroAct", [])
    assert cli.main(["report", *map(str, paths), "--out", str(tmp_path / "out")]) == 0
    md = capsys.readouterr().out
    (row,) = [r for r in _table(md, 2) if r["method"] == "RetroAct + reflection"]
    half = 4.302653 * 25 / math.sqrt(3)
    assert (row["runs"], row["seeds"]) == ("3", "0, 1, 2")
    assert row["success"] == row["last-trial return"] == f"50.0 [{50 - half:.1f}, {50 + half:.1f}]"
    # The plot draws the three seeds as one line per (method, label, split) with a t band across them; a single
    # run's band is a bootstrap over its tasks.
    from cluster.report import load_run, trial_series
    from cluster.stats import bootstrap_ci

    series, skipped = trial_series([load_run(p) for p in paths])
    assert not skipped and [s.label for s in series] == [
        "retroact: RetroAct ReAct (seen), 3 runs", "retroact: RetroAct + reflection (seen), 3 runs"]
    full = series[1]
    assert full.xs == [1, 2, 3] and full.mean == pytest.approx([0.5] * 3)
    assert full.low == pytest.approx([0.5 - half / 100] * 3) and full.high == pytest.approx([0.5 + half / 100] * 3)
    (one,) = [s for s in trial_series([load_run(paths[1])])[0] if "reflection" in s.label]
    assert one.label.endswith("1 run") and (one.low[0], one.high[0]) == bootstrap_ci([1.0, 1.0, 0.0, 0.0])


def _won(tasks: int, wins: int) -> list[Episode]:
    """`tasks` one-trial seen episodes, the first `wins` of them won."""
    return [_episode(f"t{i}", "seen", [(1.0, 2)] if i < wins else [(0.0, 5)]) for i in range(tasks)]


def test_across_seeds_pools_seeds_of_one_setting_only(tmp_path, capsys):
    """Two settings (lr 1e-5 and 2e-6) at seeds 0 and 1 each: each is one row of two runs, never pooled with the
    other (the lr 1e-5 pair wins 1 and 3 of 4: mean 50 -+ t(0.975, 1 df) * sqrt(2) * 25 / sqrt 2 = 50 -+ 317.7).
    Name, run_root and how the run was evaluated (eval.*, held-out split sizes) are not the setting; a third run
    differing only in those pools with its setting. A third setting with a single seed shows no row."""
    common = {"eto": {"iterations": 1}, "env": {"kwargs": {"per_task": {"train": 20, "seen": 30}}}}
    made = []
    for lr, seed, wins, extra in (("1e-5", 0, 1, {}), ("2e-6", 0, 2, {}), ("1e-5", 1, 3, {}), ("2e-6", 1, 2, {}),
                                  ("2e-6", 2, 2, {"run_root": "/elsewhere", "eval": {"splits": ["seen"]},
                                                  "env": {"kwargs": {"per_task": {"train": 20, "seen": 15}}}}),
                                  ("5e-5", 0, 4, {})):
        config = {**common, "eto": {"iterations": 1, "lr": lr}, **extra}
        made.append(tmp_path / f"eto-{lr}-s{seed}")
        _write_run(made[-1], "eto", seed, _won(4, wins), "ETO", [], trials=1, config=config)
    assert cli.main(["report", *map(str, made), "--out", str(tmp_path / "out")]) == 0
    rows = _table(capsys.readouterr().out, 2)
    assert [(r["config method"], r["method"], r["runs"], r["seeds"], r["success"]) for r in rows] == [
        ("eto", "ETO ReAct", "2", "0, 1", "50.0 [-267.7, 367.7]"),
        ("eto", "ETO ReAct", "3", "0, 1, 2", "50.0 [50.0, 50.0]")]


def test_an_eval_of_a_checkpoint_pools_with_its_settings_seeds(tmp_path, capsys):
    """`retrorl eval` of seed 0's checkpoint copies the training run's config to policy.yaml, so its rows ("eto-1
    ReAct", seed 0 from the policy) pool with seed 1's own evaluation ("ETO ReAct") on the same episodes: wins 2
    and 4 of 4, mean 75. An eval run of a checkpoint whose run config was not found is known by the path only."""
    from cluster.run_dir import RunDir

    trained = tmp_path / "eto-s0"
    _write_run(trained, "eto", 0, _won(4, 1), "ETO", [], trials=1, config={"eto": {"lr": 2e-6}})
    # both seeds start from one SFT checkpoint, given by its run folder's path and by its committed copy's
    (trained / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "method": "eto", "name": "eto-s0", "eto": {
        "lr": 2e-6}, "init": {"checkpoint": "/work/runs/sft-20260101-000000/checkpoints/sft"}}))
    evaluated = tmp_path / "eval-of-s0"
    _write_run(evaluated, "retroact", 5, _won(4, 2), "eto-1", [], trials=1,
               config={"init": {"checkpoint": str(trained / "checkpoints" / "eto-1")}})
    with open(evaluated / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "command", "command": "eval", "untrained_reflector": False}) + "\n")
    (trained / "checkpoints" / "eto-1").mkdir(parents=True)
    RunDir(evaluated).record_policy(str(trained / "checkpoints" / "eto-1"))
    assert yaml.safe_load((evaluated / "policy.yaml").read_text())["seed"] == 0
    seed1 = tmp_path / "eto-s1"
    _write_run(seed1, "eto", 1, _won(4, 4), "ETO", [], trials=1, config={
        "eto": {"lr": 2e-6}, "init": {"checkpoint": "results/set/sft-20260101-000000/checkpoints/sft"}})
    orphan = tmp_path / "eval-of-moved"  # same seeds' labels, but its policy is only a path
    _write_run(orphan, "eto", 2, _won(4, 0), "eto-1", [], trials=1, config={"init": {"checkpoint": "/gone/eto-1"}})
    with open(orphan / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "command", "command": "eval", "untrained_reflector": False}) + "\n")
    RunDir(orphan).record_policy("/gone/eto-1")
    assert not (orphan / "policy.yaml").exists()
    assert cli.main(["report", str(evaluated), str(seed1), str(orphan), "--out", str(tmp_path / "out")]) == 0
    md = capsys.readouterr().out
    assert "(method eval, seed 0" in md and "(method eval, seed 2" in md
    (row,) = _table(md, 2)
    assert (row["config method"], row["method"], row["runs"], row["seeds"]) == ("eto", "eto-1 ReAct / ETO ReAct",
                                                                                 "2", "0, 1")
    assert row["success"].startswith("75.0 [")


def test_an_eval_run_is_listed_as_eval_not_as_its_configs_method(tmp_path, capsys):
    """`retrorl eval` keeps the config's `method` (retroact by default) in config.yaml; its `command` record makes
    the report list it as eval, in the run list and the config-method column."""
    trained, evaluated = tmp_path / "retroact-1", tmp_path / "eval-1"
    _write_run(trained, "retroact", 0, EPISODES_B, "RetroAct", [])
    _write_run(evaluated, "retroact", 0, EPISODES_A, "sft", [])
    with open(evaluated / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "command", "command": "eval", "untrained_reflector": False}) + "\n")
    assert cli.main(["report", str(evaluated), str(trained), "--out", str(tmp_path / "out")]) == 0
    md = capsys.readouterr().out
    assert "(method eval, seed 0" in md and "(method retroact, seed 0" in md
    assert {r["config method"] for r in _table(md, 0) if r["run"] == "eval-1"} == {"eval"}


def test_reflection_gain_within_one_run(tmp_path, capsys):
    """A 3-trial run against its own first trial: t1 won at trial 1, t2 at trial 3, t3 at trial 2, t4 never.
    Two tasks won only after a reflection and none the other way: McNemar (a sign test) p = 2 * 0.5 ** 2 = 0.5;
    FR - IR per task 0, 1, 1, 0: mean 0.5, paired t = 0.5 / (sqrt(1/3) / 2) on 3 df."""
    episodes = [_episode("t1", "seen", [(1.0, 3)]), _episode("t2", "seen", [(0.0, 5), (0.0, 5), (1.0, 2)]),
                _episode("t3", "seen", [(0.0, 5), (1.0, 2)]), _episode("t4", "seen", [(0.0, 5)] * 3)]
    run = tmp_path / "retroact-1"
    _write_run(run, "retroact", 0, episodes, "Reflexion (sft actor)", [])  # a label of several words
    assert cli.main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    md = capsys.readouterr().out
    tables = sum(line.startswith("|---") for line in md.splitlines())
    (table,) = [i for i in range(tables) if "won after trial 1" in _table(md, i)[0]]
    (row,) = _table(md, table)
    assert (row["method"], row["trials"], row["tasks"], row["won after trial 1"]) == ("Reflexion (sft actor) + reflection", "3", "4", "2")
    t = 0.5 / (math.sqrt(1 / 3) / 2)
    p = 2 * (1 - (0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi))
    assert (row["McNemar p"], row["success diff"], row["FR - IR"], row["paired t p"]) == ("0.500", "+50.0", "+50.0", f"{p:.3f}")
    low, high = success_diff(1, 2, 0, 4)[1]
    assert row["success 95% CI"] == f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def test_a_difference_zero_up_to_float_error_prints_as_plus_zero(tmp_path, capsys):
    """FR - IR per task -0.1, -0.2, +0.3: in floats their mean is -1.9e-17, which a bare format prints as -0.0."""
    episodes = [_episode("a", "valid", [(0.1, 5), (0.0, 5)]), _episode("b", "valid", [(0.2, 5), (0.0, 5)]),
                _episode("c", "valid", [(0.0, 5), (0.3, 5)])]
    run = tmp_path / "sft"
    _write_run(run, "sft", 0, episodes, "SFT", [])
    assert cli.main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    md = capsys.readouterr().out
    tables = sum(line.startswith("|---") for line in md.splitlines())
    (table,) = [i for i in range(tables) if "won after trial 1" in _table(md, i)[0]]
    (row,) = _table(md, table)
    assert row["FR - IR"] == "+0.0"
