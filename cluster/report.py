"""`retrorl report RUN_DIR... [--out DIR]`: the comparison table across runs and a plot, from the runs' files only.

Reads, per run directory (cluster/run_dir.py), and writes nothing into it unless it is the output folder:
  RUN/config.yaml        `name`, `method`, `seed`; the rest of it is the run's setting (what across-seeds pools)
  RUN/policy.yaml        (a `retrorl eval` run of a checkpoint) the config of the run that trained it
  RUN/eval/results.json  rows of cluster.evaluation.evaluate(): the table, and `returns_per_trial` for panel (a)
  RUN/metrics.jsonl      `round` events (`train_return` per training round) for panel (b), `learner` events (its
                         dtype and CPU) for the run list, the `command` event (a `retrorl eval` run is listed as
                         method eval, whatever its config's `method`); bad lines are skipped
Writes OUT/report.md (also printed) and OUT/report.png, each atomically, and only once every run has been read.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cluster.run_dir import made_by, read_metrics

if TYPE_CHECKING:  # the type only: the functions import cluster.stats where they use it, as before
    from cluster.stats import Paired

RATES = ("IR", "FR", "AR", "success")  # shown x100
COLUMNS = ("split", "run", "config method", "seed", "method", "episodes", "trials", "IR", "FR", "AR", "success",
           "avg_steps", "reflection_improved")


class ReportError(Exception):
    """A run directory the report cannot read: the message names the path and what is missing."""


@dataclass
class RunData:
    path: Path
    name: str  # the run directory's name (config name + start stamp), unique per run
    method: str  # config `method`, or "eval" for a run `retrorl eval` made (it trains nothing)
    seed: Any
    rows: list[dict[str, Any]]
    rounds: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # event method -> (round, return)
    learners: list[str] = field(default_factory=list)  # "float32 on AVX2" per distinct learner start (resumes)
    # What was trained, whatever the seed: runs with the same setting are seeds of one configuration (across_seeds).
    # A training run's config without _NOT_SETTING; a `retrorl eval` run's is its policy's (policy.yaml) with the
    # eval flags, or the checkpoint's path where the training run's config was not there to copy.
    setting: dict[str, Any] = field(default_factory=dict)
    trained: str = "-"  # the config method that trained the evaluated policy ("eval" when unknown)


# Config keys that name or place a run, or say how it is evaluated, not what it trains (and init.checkpoint is
# compared by _checkpoint_id). `eto.replay` pairs a stored
# exploration of the same start, which is the one the run would play (greedy; cluster/config.py EtoCfg.replay).
# `retroact.replay` stays: a shared round-1 buffer is not an independent sample of the setting's exploration.
_NOT_SETTING = (("name",), ("seed",), ("run_root",), ("eval",), ("eto", "replay"),
                *(("env", "kwargs", "per_task", split) for split in ("valid", "seen", "unseen")))


def _checkpoint_id(path: str) -> str:
    """RUN/checkpoints/NAME as `<run folder>/checkpoints/NAME`: the run folder's name (config name + start stamp) is
    unique, and one checkpoint is often given by two paths (its run folder's, then its committed copy's)."""
    return "/".join(Path(path).parts[-3:])


def _setting(config: dict[str, Any], dtype: Any = None) -> dict[str, Any]:
    """`config` without the _NOT_SETTING keys (a copy); model.dtype "auto" as the learner resolved it (`dtype`, from
    its `learner` record), which depends on the CPU: fp32 on one machine is the same setting as pinned fp32."""
    setting = json.loads(json.dumps(config, default=str))
    model = setting.get("model")
    if isinstance(model, dict) and model.get("dtype") == "auto" and isinstance(dtype, str):
        model["dtype"] = dtype
    init = setting.get("init")
    if isinstance(init, dict) and isinstance(init.get("checkpoint"), str):
        init["checkpoint"] = _checkpoint_id(init["checkpoint"])
    for path in _NOT_SETTING:
        node = setting
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return setting


def _read(path: Path, given: str, parse: Callable[[str], Any], kind: str, hint: str = "") -> Any:
    """A run file parsed, or one ReportError naming the run and the file (missing or unreadable)."""
    if not path.is_file():
        relative = path.relative_to(Path(given)).as_posix()
        raise ReportError(f"{given}: missing {relative}" + (f" ({hint})" if hint else ""))
    try:
        return parse(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ReportError(f"{path}: unreadable {kind} ({exc})") from None


def load_run(path: str | Path) -> RunData:
    given = str(path)
    root = Path(path)
    if not root.is_dir():
        raise ReportError(f"{given}: no such run directory")
    results = _read(root / "eval" / "results.json", given, json.loads, "results", "evaluate the run first")
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise ReportError(f"{root / 'eval' / 'results.json'}: expected a list of result rows")
    config = _read(root / "config.yaml", given, yaml.safe_load, "config")
    if not isinstance(config, dict):
        raise ReportError(f"{root / 'config.yaml'}: expected a mapping")
    records = read_metrics(root / "metrics.jsonl")
    command = made_by(records)
    dtype = next((r.get("dtype") for r in records if r.get("event") == "learner"), None)
    seed, trained, setting = config.get("seed", "-"), str(config.get("method", "-")), _setting(config, dtype)
    method = trained
    if command["command"] == "eval":
        method, trained = "eval", "eval"
        policy = _read(root / "policy.yaml", given, yaml.safe_load, "policy") if (root / "policy.yaml").is_file() \
            else None
        # Every setting has `method` (a config field from the start), so a policy known by its path only, or changed
        # by the eval flags, never agrees with a trained config (_agree compares the keys both have).
        checkpoint = (config.get("init") or {}).get("checkpoint")
        setting = {"method": "eval", "policy": _checkpoint_id(checkpoint) if isinstance(checkpoint, str) else None}
        if isinstance(policy, dict):
            seed, trained, setting = policy.get("seed", "-"), str(policy.get("method", "-")), _setting(policy)
        if command.get("untrained_reflector") or command.get("reflector_checkpoint"):  # not the policy as trained
            setting = {"method": "eval", "policy": setting, "untrained_reflector": command.get("untrained_reflector"),
                       "reflector_checkpoint": command.get("reflector_checkpoint")}
    return RunData(path=root.resolve(), name=root.resolve().name, method=method, seed=seed, rows=results,
                   rounds=_rounds(records), learners=_learners(records), trained=trained, setting=setting)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _rounds(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """train_return per round, per logged method; a round logged twice (a resumed run) keeps its last record."""
    by_method: dict[str, dict[int, float]] = {}
    for record in records:
        if record.get("event") != "round":
            continue
        step, ret = record.get("round"), _number(record.get("train_return"))
        if isinstance(step, bool) or not isinstance(step, int) or ret is None:
            continue
        by_method.setdefault(str(record.get("method", "-")), {})[step] = ret
    return {m: sorted(points.items()) for m, points in by_method.items()}


def _learners(records: list[dict[str, Any]]) -> list[str]:
    """Where the learner trained, once per distinct (dtype, CPU) in start order: runs on other machines differ."""
    seen: list[str] = []
    for record in records:
        if record.get("event") == "learner":
            where = f"{record.get('dtype', '-')} on {record.get('cpu_capability', '-')}"
            if where not in seen:
                seen.append(where)
    return seen


def _names(runs: Sequence[RunData]) -> list[str]:
    """Run directory names, or full paths where two runs given share a name."""
    names = [r.name for r in runs]
    return [str(r.path) if names.count(r.name) > 1 else r.name for r in runs]


def _cell(column: str, value: Any) -> str:
    if column in RATES or column == "reflection_improved":
        number = _number(value)
        return "-" if number is None else f"{100 * number:.1f}"
    if column == "avg_steps":
        number = _number(value)
        return "-" if number is None else f"{number:.1f}"
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def table_rows(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """One entry per (run, method label, split): sorted by split, then the order runs were given, then file order."""
    entries = []
    for run_index, (run, name) in enumerate(zip(runs, _names(runs))):
        for row_index, row in enumerate(run.rows):
            entries.append(((str(row.get("split", "-")), run_index, row_index),
                            {**row, "run": name, "config method": run.method, "seed": run.seed}))
    return [entry for _, entry in sorted(entries, key=lambda e: e[0])]


def _where(path: Path, base: Path | None) -> str:
    """A run's folder relative to the report's folder, so a committed report reads the same on every checkout."""
    return str(path) if base is None else os.path.relpath(path, base.resolve())


def markdown(runs: Sequence[RunData], skipped: list[str], png_name: str | None, base: Path | None = None) -> str:
    lines = ["# retrorl report", "", "Runs:"]
    lines += [f"- `{name}`: {_where(run.path, base)} (method {run.method}, seed {run.seed}"
              + "".join(f", learner {where}" for where in run.learners) + ")" for run, name in zip(runs, _names(runs))]
    lines += ["", "Returns and rates x100; avg_steps in env steps per trial.", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table_rows(runs):
        lines.append("| " + " | ".join(_cell(c, row.get(c)) for c in COLUMNS) + " |")
    lines.append("")
    if png_name:
        lines += [f"![return per trial and per training round]({png_name})", ""]
    if skipped:
        lines.append("Not in the return-per-trial plot (their results.json rows have no `returns_per_trial`; "
                     "re-evaluate the run to plot them):")
        lines += [f"- {s}" for s in skipped]
        lines.append("")
    lines += by_kind(runs)
    lines += paired(runs)
    lines += reflection_gain(runs)
    no_rounds = [name for run, name in zip(runs, _names(runs)) if not run.rounds]
    if no_rounds:
        lines += ["No training rounds in metrics.jsonl: " + ", ".join(f"`{n}`" for n in no_rounds), ""]
    return "\n".join(lines)


def by_kind(runs: Sequence[RunData]) -> list[str]:
    """Success per game kind (task family), `won/tasks`, for every row whose outcomes name their kind (episodes
    stored since kinds were tagged); one table per split, a column per kind in alphabetical order."""
    tables: dict[str, tuple[set[str], list[tuple[str, str, dict[str, list[int]]]]]] = {}
    for row in table_rows(runs):
        outcomes = row.get("outcomes")
        if not isinstance(outcomes, list) or not outcomes or not all(
                isinstance(o, dict) and isinstance(o.get("kind"), str) for o in outcomes):
            continue
        counts: dict[str, list[int]] = {}
        for o in outcomes:
            won_n = counts.setdefault(o["kind"], [0, 0])
            won_n[0] += bool(o.get("success"))
            won_n[1] += 1
        kinds, rows = tables.setdefault(str(row.get("split", "-")), (set(), []))
        kinds.update(counts)
        rows.append((str(row["run"]), str(row.get("method")), counts))
    lines = []
    for split, (kind_set, rows) in tables.items():
        kinds = sorted(kind_set)
        lines += [f"Success per kind on `{split}` (tasks won / tasks):", "",
                  "| run | method | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 2)]
        for name, method, counts in rows:
            cells = [f"{counts[k][0]}/{counts[k][1]}" if k in counts else "-" for k in kinds]
            lines.append(f"| `{name}` | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _outcomes(row: dict[str, Any]) -> dict[str, tuple[bool, float]] | None:
    """task id -> (success, the row's last padded trial return), from a row's `outcomes`; None for older rows."""
    outcomes = row.get("outcomes")
    if not isinstance(outcomes, list):
        return None
    pairs = {}
    for o in outcomes:
        returns = o.get("returns") if isinstance(o, dict) else None
        if not (isinstance(returns, list) and returns and _number(returns[-1]) is not None and "task" in o):
            return None
        pairs[str(o["task"])] = (bool(o.get("success")), float(returns[-1]))
    return pairs


def _pct(value: float | None, signed: bool = False) -> str:
    # + 0.0 turns a -0.0 (a difference that is zero up to float error) into +0.0
    return "-" if value is None else f"{round(100 * value, 1) + 0.0:{'+' if signed else ''}.1f}"


def _ci(interval: tuple[float, float] | None) -> str:
    return "-" if interval is None else f"[{_pct(interval[0], True)}, {_pct(interval[1], True)}]"


def _p(value: float | None) -> str:
    return "-" if value is None else (f"{value:.3f}" if value >= 0.001 else "<0.001")


def _kind(label: Any) -> str:
    """What an eval row is, without the policy's name: "SFT ReAct" -> "ReAct", "Reflexion (sft actor) + reflection"
    -> "+ reflection" (the two suffixes cluster/evaluation.py gives its rows)."""
    text = str(label)
    return next((kind for kind in ("ReAct", "+ reflection") if text.endswith(kind)), text.split(" ", 1)[-1])


def _pair_rows(row: dict[str, Any], ref: dict[str, Any]) -> Paired | None:
    """`row` against `ref` task by task: from per-task outcomes, or from the solved lists of rows stored before
    them (success only: McNemar and the success difference need no more); None when neither pair has them."""
    from cluster.stats import compare, from_counts

    mine, theirs = _outcomes(row), _outcomes(ref)
    if mine is not None and theirs is not None:
        return compare(mine, theirs)
    if isinstance(row.get("solved"), list) and isinstance(ref.get("solved"), list):
        won, ref_won = set(row["solved"]), set(ref["solved"])
        return from_counts(len(won & ref_won), len(won - ref_won), len(ref_won - won), row.get("episodes"))
    return None


def _success_and_return(c: Paired) -> str:
    """The success difference with its CI, then the return difference with its CI and p ("-" without returns)."""
    return (f"{_pct(c.success_diff, True)} | {_ci(c.success_ci)} | {_pct(c.return_diff, True)} | "
            f"{_ci(c.return_ci)} | {_p(c.p_return)}")


def paired(runs: Sequence[RunData]) -> list[str]:
    """Every later run against the first (the baseline), row by row where split and number of trials match.
    Rows with per-task `outcomes` get paired statistics on the tasks both evaluated (cluster/stats.py): exact
    McNemar on success, the mean return difference (FR for K-trial rows, IR for one-trial rows) with a bootstrap
    95% CI and a paired t-test; older rows with only `solved` get the game counts and McNemar (it needs no more)."""
    if len(runs) < 2:
        return []
    names = _names(runs)
    base = {(r.get("split"), r.get("trials"), r.get("method")): r for r in runs[0].rows}
    base_kind = {(r.get("split"), r.get("trials"), _kind(r.get("method"))): r for r in runs[0].rows}
    base_any = {(r.get("split"), r.get("trials")): r for r in runs[0].rows}
    lines = []
    for run, name in zip(runs[1:], names[1:]):
        for row in run.rows:
            key = (row.get("split"), row.get("trials"))
            # The same label when the baseline has it (SFT ReAct vs SFT ReAct), else the same kind of row (an eval
            # labelled "sft ReAct" vs the SFT run's "SFT ReAct"), else any row of that shape.
            ref = (base.get((*key, row.get("method"))) or base_kind.get((*key, _kind(row.get("method"))))
                   or base_any.get(key))
            if ref is None:
                continue
            c = _pair_rows(row, ref)
            if c is None:
                continue
            lines.append(f"| {row.get('split')} | `{name}` | {row.get('method')} | {ref.get('method')} | {c.tasks} | "
                         f"{c.only_a} | {c.only_b} | {c.both} | {_p(c.p_success)} | {_success_and_return(c)} |")
    if not lines:
        return []
    header = [(f"Paired, task by task, against `{names[0]}` (same split and number of trials): tasks won only by "
               "the run, only by the baseline, by both; exact McNemar p on success and the success-rate difference "
               "x100 (run - baseline) with Newcombe's paired score 95% CI; the mean return difference x100 (FR for "
               "K-trial rows, IR for one-trial rows), its bootstrap 95% CI and a paired t-test p. Rows from runs "
               "without per-task returns show the success columns only."), "",
              "| split | run | method | baseline | tasks | only run | only baseline | both | McNemar p | "
              "success diff | success 95% CI | return diff | return 95% CI | paired t p |", "|" + "---|" * 14]
    return header + lines + ["", *across_seeds(runs)]


def reflection_gain(runs: Sequence[RunData]) -> list[str]:
    """Within each run, its K-trial row (the agent with its reflector) against its own first trial (the ReAct row,
    the same episodes' trial 1): what the later trials added, paired task by task. Success by trial K includes
    trial 1, so no task is won only at trial 1 and McNemar is the sign test of the tasks won after a reflection."""
    lines = []
    for run, name in zip(runs, _names(runs)):
        first = {r.get("split"): r for r in run.rows if r.get("trials") == 1 and _kind(r.get("method")) == "ReAct"}
        for row in run.rows:
            trials, ref = row.get("trials"), first.get(row.get("split"))
            if not isinstance(trials, int) or trials < 2 or ref is None:
                continue
            c = _pair_rows(row, ref)
            if c is None:
                continue
            lines.append(f"| {row.get('split')} | `{name}` | {row.get('method')} | {trials} | {c.tasks} | "
                         f"{c.only_a} | {_p(c.p_success)} | {_success_and_return(c)} |")
    if not lines:
        return []
    return [("Reflection within each run: the K-trial row against the same episodes' first trial (the run's "
             "ReAct row), task by task: tasks won only after trial 1, McNemar p (a sign test here), the success "
             "difference x100 with Newcombe's paired 95% CI, FR - IR x100 with its bootstrap 95% CI and a paired "
             "t-test p."), "",
            "| split | run | method | trials | tasks | won after trial 1 | McNemar p | success diff | "
            "success 95% CI | FR - IR | return 95% CI | paired t p |", "|" + "---|" * 12, *lines, ""]


def _seed_rows(run: RunData) -> list[tuple[str, dict[str, Any]]]:
    """(what the row is, row) for each row. The kind ("ReAct", "+ reflection") for a `retrorl eval` run's rows and a
    training run's own final rows (labelled by its method: "ETO ReAct"), so that an eval of a seed's checkpoint
    ("eto-1 ReAct") pools with another seed's in-run evaluation; the full label otherwise (a run's before-training
    "SFT ReAct", an eval run from before the `command` record, taken for a training run) and where a run has two
    rows of one kind on one split ("Retroformer best-of-4 + reflection" beside "Retroformer + reflection")."""
    def kind(row: dict[str, Any]) -> str:
        label = str(row.get("method"))
        own = run.method == "eval" or label.lower().startswith(f"{run.method.lower()} ")
        return _kind(label) if own else label

    kinds = [(r.get("split"), r.get("trials"), kind(r)) for r in run.rows]
    return [(k[2] if kinds.count(k) == 1 else str(r.get("method")), r) for k, r in zip(kinds, run.rows)]


def _agree(a: Any, b: Any) -> bool:
    """Two settings are one where both have a key: a key only one has is a config field added between their runs
    (config.yaml holds every field the run's version had, so no other key goes missing)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return all(_agree(a[k], b[k]) for k in a.keys() & b.keys())
    return a == b


def across_seeds(runs: Sequence[RunData]) -> list[str]:
    """Seeds of one setting (RunData.setting: the same config but for name, seed and how it was evaluated):
    per (row kind, split, trials, episodes), the mean over runs of success and of the last-trial return, with a t
    95% CI. Runs of different settings are never pooled; a setting shows once it has two seeds."""
    from cluster.stats import mean_ci

    settings: list[dict[str, Any]] = []  # one per setting, the first run's
    groups: dict[tuple[int, str, str, Any, Any], list[tuple[RunData, dict[str, Any]]]] = {}
    for run in runs:
        index = next((i for i, s in enumerate(settings) if _agree(s, run.setting)), len(settings))
        if index == len(settings):
            settings.append(run.setting)
        for kind, row in _seed_rows(run):
            key = (index, kind, str(row.get("split")), row.get("trials"), row.get("episodes"))
            groups.setdefault(key, []).append((run, row))
    lines = []
    for members in groups.values():
        seeds = sorted({str(run.seed) for run, _ in members})
        if len(seeds) < 2:
            continue
        cells = []
        for values in ([_number(r.get("success")) for _, r in members],
                       [_number((_curve(r) or [None])[-1]) for _, r in members]):
            numbers = [v for v in values if v is not None]
            if not numbers:
                cells.append("-")
                continue
            mean, low, high = mean_ci(numbers)
            cells.append(_pct(mean) + ("" if low is None else f" [{_pct(low)}, {_pct(high)}]"))
        labels = " / ".join(dict.fromkeys(str(r.get("method")) for _, r in members))
        trained = " / ".join(dict.fromkeys(run.trained for run, _ in members))
        lines.append((str(members[0][1].get("split")), labels, f"| {members[0][1].get('split')} | {trained} | "
                      f"{labels} | {len(members)} | {', '.join(seeds)} | {cells[0]} | {cells[1]} |"))
    if not lines:
        return []
    return ["Across seeds (runs of one setting: the same config but for name, seed and evaluation): mean over runs "
            "x100 and its t 95% CI.", "",
            "| split | config method | method | runs | seeds | success | last-trial return |", "|" + "---|" * 7,
            *[line for *_, line in sorted(lines, key=lambda entry: entry[:2])], ""]


def _curve(row: dict[str, Any]) -> list[float] | None:
    values = row.get("returns_per_trial")
    if not isinstance(values, list) or not values:
        return None
    numbers = [_number(v) for v in values]
    return None if any(n is None for n in numbers) else numbers  # type: ignore[return-value]


def _finish_axis(ax, title: str, xlabel: str, ylabel: str, empty: str) -> None:
    """Shared axis dressing: titles, integer x ticks, 0-100 y range, a legend below, or a note when empty."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    if ax.lines:
        xs = [x for line in ax.lines for x in line.get_xdata()]
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)  # whole trials / rounds, even for a single point
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)


def palette(n: int) -> list[str]:
    """`n` distinct colours: matplotlib's 10 qualitative ones while they last, tab20 up to 20, then evenly spaced
    hues (results/new-games draws 18 curves; C0-C9 would repeat from the eleventh)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        return [to_hex(c) for c in colormaps["tab20"].colors[:n]]
    return [to_hex(colormaps["turbo"](i / (n - 1))) for i in range(n)]


@dataclass
class Series:
    """One line of the plot: the mean over the runs of a group, and its 95% band where one can be computed."""
    label: str
    xs: list[int]
    mean: list[float]
    low: list[float | None]
    high: list[float | None]
    style: str = "-"


def _band(values: list[float], per_task: list[float] | None) -> tuple[float, float | None, float | None]:
    """Mean over runs with a t interval across them; a single run's interval is a bootstrap over its tasks."""
    from cluster.stats import bootstrap_ci, mean_ci

    if len(values) > 1 or not per_task:
        return mean_ci(values)
    ci = bootstrap_ci(per_task)
    return values[0], *(ci if ci is not None else (None, None))


def trial_series(runs: Sequence[RunData]) -> tuple[list[Series], list[str]]:
    """Panel (a): runs grouped by (config method, row label, split), so seeds of one method are one line with a
    band, not one legend entry each; and the (run, label, split) rows without a curve."""
    splits = sorted({str(r.get("split", "-")) for run in runs for r in run.rows})
    styles = ["-", "--", ":", "-."]  # one line style per split
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    skipped = []
    for run, name in zip(runs, _names(runs)):
        for row in run.rows:
            label, split = str(row.get("method", "-")), str(row.get("split", "-"))
            if _curve(row) is None:
                skipped.append(f"`{name}` / {label} / {split}")
                continue
            groups.setdefault((run.method, label, split), []).append(row)
    series = []
    for (method, label, split), rows in groups.items():
        curves = [_curve(r) for r in rows]
        n = min(len(c) for c in curves)  # type: ignore[arg-type]
        points = []
        for k in range(n):
            outcomes = rows[0].get("outcomes") if len(rows) == 1 else None
            per_task = [o["returns"][k] for o in outcomes] if isinstance(outcomes, list) else None
            points.append(_band([c[k] for c in curves], per_task))  # type: ignore[index]
        series.append(Series(f"{method}: {label} ({split}), {len(rows)} run{'s' if len(rows) > 1 else ''}",
                             list(range(1, n + 1)), [p[0] for p in points], [p[1] for p in points],
                             [p[2] for p in points], styles[splits.index(split) % len(styles)]))
    return series, skipped


def round_series(runs: Sequence[RunData]) -> list[Series]:
    """Panel (b): train_return per round, runs grouped by (config method, logged method), mean and t band."""
    groups: dict[tuple[str, str], dict[int, list[float]]] = {}
    for run in runs:
        for method, points in run.rounds.items():
            for step, ret in points:
                groups.setdefault((run.method, method), {}).setdefault(step, []).append(ret)
    series = []
    for (config_method, method), by_round in sorted(groups.items()):
        steps = sorted(by_round)
        bands = [_band(by_round[step], None) for step in steps]
        runs_in = max(len(v) for v in by_round.values())
        series.append(Series(f"{config_method}: {method}, {runs_in} run{'s' if runs_in > 1 else ''}", steps,
                             [b[0] for b in bands], [b[1] for b in bands], [b[2] for b in bands]))
    return series


def _draw(ax, series: list[Series]) -> None:
    for line, colour in zip(series, palette(len(series))):
        single = len(line.xs) == 1  # a ReAct row: its one trial, drawn as a hollow square around that point
        ax.plot(line.xs, [100 * v for v in line.mean], color=colour, marker="s" if single else "o",
                markersize=11 if single else 6, markerfacecolor="none" if single else colour,
                linestyle=line.style, label=line.label)
        if all(v is not None for v in line.low + line.high):
            low, high = [100 * v for v in line.low], [100 * v for v in line.high]  # type: ignore[operator]
            if single:
                ax.errorbar(line.xs, [100 * v for v in line.mean], yerr=[[m * 100 - lo for m, lo in zip(
                    line.mean, low)], [hi - m * 100 for m, hi in zip(line.mean, high)]], color=colour, capsize=4)
            else:
                ax.fill_between(line.xs, low, high, color=colour, alpha=0.15, linewidth=0)


def plot(runs: Sequence[RunData]) -> tuple[bytes, list[str]]:
    """PNG bytes of the two panels, and the (run, label, split) rows left out of panel (a)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 6), dpi=100)
    FigureCanvasAgg(fig)
    per_trial, per_round = fig.subplots(1, 2)
    trials, skipped = trial_series(runs)
    _draw(per_trial, trials)
    _finish_axis(per_trial, "(a) mean return per trial (eval), 95% CI", "trial",
                 "mean return x100 (padded after a win)", "no rows with returns_per_trial")
    _draw(per_round, round_series(runs))
    _finish_axis(per_round, "(b) train_return per training round, 95% CI", "round", "mean training return x100",
                 "no training rounds")

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue(), skipped


def default_out(run_dirs: Sequence[str | Path]) -> Path:
    return Path(run_dirs[0]) / "eval" if len(run_dirs) == 1 else Path("report")


def render(run_dirs: Sequence[str | Path], out_dir: Path) -> tuple[str, bytes]:
    """report.md's text and report.png's bytes for reports written to out_dir (run paths shown relative to it)."""
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(p) for p in run_dirs]
    png, skipped = plot(runs)
    return markdown(runs, skipped, "report.png", base=out_dir), png


def report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> tuple[str, Path, Path]:
    """Read every run, render both outputs in memory, then write them; a ReportError leaves nothing written."""
    from envs.atomic import write_atomic

    out_dir = Path(out) if out is not None else default_out(run_dirs)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"{out_dir}: --out exists and is not a directory")
    text, png = render(run_dirs, out_dir)
    md_path, png_path = out_dir / "report.md", out_dir / "report.png"
    write_atomic(png_path, png)
    write_atomic(md_path, text.encode())
    return text, md_path, png_path


def main(run_dirs: Sequence[str], out: str | None = None) -> int:
    import sys

    try:
        text, md_path, png_path = report(run_dirs, out)
    except ReportError as exc:
        print(f"retrorl: error: {exc}", file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {md_path} and {png_path}")
    return 0
