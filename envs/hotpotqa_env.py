"""HotpotQA family: ReAct's Search / Lookup / Finish tools over each question's own paragraphs (distractor setting).

No registry ships HotpotQA, so the questions come from a file the user provides, in HotpotQA's official JSON format
(a list of {_id, question, answer, type, level, supporting_facts, context}); the distractor dev file is
http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json (7405 questions, each with its 2 gold and 8
distractor paragraphs). `data_file=` names it (default `<cache_dir>/hotpotqa/hotpot_dev_distractor_v1.json`).

* The searchable corpus of an episode is the question's `context`: 10 paragraphs, each a title and its sentences.
  No Wikipedia, no network.
* Tools, with the texts of ReAct's wikienv.py (github.com/ysymyth/ReAct, wikienv.py: search_step / step /
  get_page_obs) and of the few-shot prompts all three papers reuse (ReAct's prompts_naive.json `webthink_simple6`,
  copied as WEBTHINK_SIMPLE6 into Reflexion's and Retroformer's hotpotqa_runs/fewshots.py):
  - `Search[entity]`: the paragraph whose title matches the entity (case and punctuation ignored; else the closest
    title by difflib ratio >= FUZZY_CUTOFF) -> its first SEARCH_SENTENCES sentences (ReAct's get_page_obs keeps 5).
    No match -> "Could not find [entity]. Similar: [...]." with the SIMILAR_TITLES context titles closest to it
    (the prompts' text; ReAct lists 5 search hits).
  - `Lookup[keyword]`: the next sentence of the last searched paragraph that contains the keyword,
    "(Result i / n) sentence"; "No more results." once they run out (wikienv.py); a new keyword restarts the count.
    Before any successful Search: Reflexion's text (hotpotqa_runs/environment.py: "The last page Searched was not
    found, ...").
  - `Finish[answer]`: ends the episode with Reflexion's / Retroformer's observation "Answer is CORRECT" or
    "Answer is INCORRECT" (hotpotqa_runs/environment.py).
  - `Think[...]`: "Nice thought." (wikienv.py), a valid step that changes nothing.
  Anything else (no tool, unknown tool, empty argument) is ReAct's "Invalid action: <action>" with valid False.
  Tool names are case-insensitive (`search[x]` and `Search[x]` are the same), a missing final `]` is tolerated.
* Score: HotpotQA's official metrics (hotpot_evaluate_v1.py, copied as normalize_answer / f1_score into ReAct's
  wrappers.py): `won` = exact match after normalisation (lower case, no punctuation, no articles, single spaces);
  `score` = token F1 of the Finish answer (0 for yes/no answers that differ), 0 until Finish. Reward is 1 on a win.
* Splits, by a hash of `_id` (sha256; the order of the questions in the file does not matter): the questions are
  sorted by hash; `unseen` = the first `n_unseen` (100, the size Reflexion and Retroformer evaluate on; ReAct used
  500), `seen` = the next `n_seen`, `train` = the next `n_train` (None = all the rest), `valid` = the LAST `n_valid`
  (default None: as many as `n_seen`) by hash, after train's (`core.split_off_valid`: never a train question, and
  train's list is the same whatever n_valid; with `n_train=None` train stops where valid starts, and valid gets at
  most half of what seen leaves). With `eval_file=` (e.g. `data_file` = the train file, `eval_file` = the
  distractor dev file), `unseen` is the first `n_unseen` of the eval file by hash and `seen` / `train` / `valid`
  come from `data_file`, without the eval file's ids. `unseen_ids=` picks the
  unseen questions by id instead (in that order, first `n_unseen`): `"reflexion"` = the 100 distractor-dev questions
  Reflexion and Retroformer evaluate on (REFLEXION_DEV_IDS), so their numbers compare; an id missing from the file
  is an EnvError. ReAct's 500 (a seed-233 shuffle of its own dev file's indices) are not reproduced.
* Task ids `hotpotqa:<_id>`; `kind` = the question's type (`bridge` / `comparison`). `max_steps` (default 6, the
  Reflexion / Retroformer limit: their ReactAgent halts when step_n > max_steps=6; ReAct's notebook allows 7).
* Expert: Search each supporting-fact title once (in order), then Finish[gold answer]: 3 steps for HotpotQA's two
  gold paragraphs. It wins on every well-formed question (the gold answer matches itself exactly).
* Cache: the selected questions of every split are written once to `<cache_dir>/hotpotqa/split-<key>.json`, keyed by
  the files (path, size, mtime) and the counts, so env workers do not each parse a 540 MB train file.

Everything is standard library; no extra to install.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .atomic import write_json_atomic
from .cache import file_lock, read_json, resolve_cache_dir
from .core import EnvError, INVALID_ACTION_OBS, SPLITS, StepInfo, Task, TextEnv, check_split, split_off_valid

DEV_URL = "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json"
DEFAULT_FILE_NAME = "hotpot_dev_distractor_v1.json"
SEARCH_SENTENCES = 5  # ReAct's get_page_obs: ' '.join(sentences[:5])
SIMILAR_TITLES = 5  # ReAct's search_step: result_titles[:5]
FUZZY_CUTOFF = 0.8  # difflib ratio above which a misspelt / partial title still finds its paragraph
DEFAULT_MAX_STEPS = 6  # Reflexion / Retroformer ReactAgent(max_steps=6); ReAct's notebook loops 7 times
_CACHE_VERSION = 2  # 2: the valid split
# The 100 distractor-dev questions Reflexion and Retroformer evaluate on: the `_id`s, in order, of their
# hotpotqa_runs/data/hotpot-qa-distractor-sample.joblib (the same blob dbf733c in both repositories; read from the
# pickle's strings, as joblib is not installed here). `unseen_ids="reflexion"` selects them from the dev file.
REFLEXION_DEV_IDS: tuple[str, ...] = (
    "5a7613c15542994ccc9186bf", "5adf2fa35542993344016c11", "5adfdef9554299025d62a36b", "5a7180205542994082a3e856",
    "5a78bc6b554299148911f979", "5abdd0f15542991f6610604d", "5a8e27d45542995a26add46a", "5a881d2355429938390d3eeb",
    "5ae4a1ef55429970de88d9e7", "5ae6f2a7554299572ea5464a", "5a845d735542996488c2e52e", "5adf5daf5542995534e8c79d",
    "5a7c49dc55429935c91b514f", "5abe364e5542993f32c2a08e", "5ac557975542993e66e8231c", "5ab28a87554299449642c8ec",
    "5adff056554299603e4183cc", "5abd578a5542993062266c5d", "5a7b537555429927d897bf90", "5a7dc3275542997cc2c4749c",
    "5ab5487b554299494045ef68", "5ac2758b55429963665199c3", "5ab7f97a5542991d322237ef", "5a81e107554299676cceb12a",
    "5ab6f7415542991d322236f4", "5ac562985542993e66e823ca", "5a87bd4e5542994846c1cde0", "5aba52e655429939ce03dc94",
    "5ab58f9a554299488d4d99da", "5ae67def5542991bbc9760f3", "5adeb78a554299728e26c77a", "5ae66d515542992ae0d16346",
    "5a8e60ca5542995a26add4d9", "5a72a2935542991f9a20c546", "5a7f7b3b5542992097ad2f81", "5a82ebb855429966c78a6a9c",
    "5add596f5542990dbb2f7e4d", "5ac4db1d554299076e296e1a", "5ac532335542994611c8b41c", "5ae7a8d35542994a481bbdbb",
    "5a8db348554299068b959dc2", "5adcbb815542994ed6169bde", "5ab915ad55429919ba4e239c", "5ab94fa25542996be2020474",
    "5a7ca0ef55429907fabeefd3", "5a7a5b3a5542996c55b2dd71", "5abbd3ac55429931dba1458b", "5ac3af895542995ef918c1f0",
    "5a72dcb45542992359bc31af", "5ae1e22a5542997f29b3c160", "5ae6316d5542996de7b71b87", "5ade4801554299728e26c6ab",
    "5a9064c755429916514e74a6", "5addc79d5542995b365fab7b", "5ac097b05542996f0d89cc18", "5a79caad5542994f819ef09f",
    "5a83a31c554299123d8c2179", "5a72830e5542994cef4bc2f9", "5abaca935542996606241610", "5ae0a59a55429945ae9593e2",
    "5ab700ca5542991d32223736", "5a8bd49d5542997f31a41dd7", "5ae4d3a55542990ba0bbb164", "5ab29346554299545a2cf997",
    "5a776fc15542997042120a3a", "5ab3ede755429976abd1bcf4", "5a80071f5542992bc0c4a684", "5ae08a0455429924de1b70fc",
    "5ab484415542990594ba9c44", "5a811667554299260e20a23d", "5a81c7d15542990a1d231ea9", "5a716ec85542994082a3e82d",
    "5ade25ed5542997c77aded70", "5a89dd4d554299669944a5e3", "5abba3cd554299642a094aee", "5ac540365542994611c8b470",
    "5ae199305542997b2ef7d20e", "5ae789615542997ec2727695", "5a75e67d5542992db9473709", "5a8a5a1955429930ff3c0da7",
    "5a7bc0755542995eb53be9a5", "5ae7535c5542997b22f6a6d8", "5adf95745542995534e8c7f8", "5adf3c155542993a75d2643a",
    "5ac1a6bf5542991316484b8d", "5a87b2fc5542996e4f3088d0", "5a807ca5554299485f598613", "5adf1b8a5542995534e8c750",
    "5a87081755429960ec39b6fe", "5ab322b1554299194fa93570", "5a80721b554299485f5985ef", "5a85fb085542994775f606de",
    "5a79c1335542994bb9457066", "5a774e9c55429972597f14f3", "5adcdea85542992c1e3a2441", "5ac509e95542994611c8b333",
    "5a8b42be55429949d91db515", "5ab9b2c7554299743d22ebaf", "5a7b63eb55429931da12ca7e", "5a7ea14655429930675135ab",
)
_REQUIRED = ("_id", "question", "answer", "context")

FIRST_OBS = (
    "Answer the question with interleaving Thought and Action steps. Action can be three types:\n"
    "(1) Search[entity], which searches the exact entity among the question's paragraphs and returns the first "
    "sentences if it exists. If not, it will return some similar entities to search.\n"
    "(2) Lookup[keyword], which returns the next sentence containing keyword in the current paragraph.\n"
    "(3) Finish[answer], which returns the answer and finishes the task."
)  # ReAct's hotpotqa.ipynb instruction, with "on Wikipedia" -> "among the question's paragraphs"
NO_PAGE = ("The last page Searched was not found, so you cannot Lookup a keyword in it. "
           "Please try one of the similar pages given.")  # Reflexion hotpotqa_runs/environment.py
NO_MORE = "No more results."  # ReAct wikienv.py (without its trailing newline)
CORRECT, INCORRECT = "Answer is CORRECT", "Answer is INCORRECT"  # Reflexion / Retroformer environment.py
THOUGHT_OBS = "Nice thought."  # ReAct wikienv.py
_ACTION = re.compile(r"^\s*(\w+)\s*\[(.*)$", re.DOTALL)
_PUNCTUATION = frozenset(string.punctuation)


# -- HotpotQA's official answer metrics (hotpot_evaluate_v1.py; ReAct wrappers.py normalize_answer / f1_score) ---
def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def f1_score(prediction: str, gold: str) -> float:
    pred, truth = normalize_answer(prediction), normalize_answer(gold)
    # yes / no / noanswer only count when identical (the official script's special case)
    if (pred in ("yes", "no", "noanswer") or truth in ("yes", "no", "noanswer")) and pred != truth:
        return 0.0
    pred_tokens, truth_tokens = pred.split(), truth.split()
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def _id_hash(qid: str) -> str:
    return hashlib.sha256(qid.encode()).hexdigest()


def _title_key(title: str) -> str:
    return " ".join(title.casefold().split())


def _missing_file_error(path: Path, what: str) -> EnvError:
    return EnvError(
        f"the hotpotqa env needs a HotpotQA JSON file ({what}: {path}); no package registry ships HotpotQA. "
        f"Download the distractor dev file, e.g. `curl -L -o {path} {DEV_URL}` (or the train file "
        "hotpot_train_v1.1.json from https://hotpotqa.github.io), and name it with env.kwargs.data_file "
        "(`--set env.kwargs.data_file=/path/to/file.json`); eval_file= adds a separate evaluation file."
    )


def _read_questions(path: Path, what: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise _missing_file_error(path, f"{what} not found") from e
    except (OSError, ValueError) as e:
        raise _missing_file_error(path, f"{what} unreadable, {type(e).__name__}: {e}") from e
    if not isinstance(data, list) or not all(isinstance(q, dict) for q in data):
        raise _missing_file_error(path, f"{what} is not a JSON list of questions")
    bad = [i for i, q in enumerate(data) if any(k not in q for k in _REQUIRED)]
    if bad:
        raise _missing_file_error(path, f"{what}: question #{bad[0]} lacks one of {', '.join(_REQUIRED)}")
    return data


def _by_hash(questions: list[dict[str, Any]], exclude: set[str] = frozenset()) -> list[dict[str, Any]]:
    unique = {q["_id"]: q for q in questions if q["_id"] not in exclude}
    return [unique[qid] for qid in sorted(unique, key=_id_hash)]


def _compact(q: dict[str, Any]) -> dict[str, Any]:
    return {k: q.get(k) for k in ("_id", "question", "answer", "type", "level", "supporting_facts", "context")}


class HotpotQAEnv(TextEnv):
    family = "hotpotqa"
    needs = "a HotpotQA JSON file (env.kwargs.data_file)"
    data = ("the user's HotpotQA file (distractor setting: each question's 10 context paragraphs are the corpus); "
            "expert demos: supporting facts")

    def __init__(
        self,
        data_file: str | os.PathLike[str] | None = None,
        eval_file: str | os.PathLike[str] | None = None,
        n_train: int | None = 1000,
        n_seen: int = 100,
        n_unseen: int = 100,
        n_valid: int | None = None,
        unseen_ids: str | Sequence[str] | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.data_file = Path(data_file).expanduser() if data_file else self.cache_dir / "hotpotqa" / DEFAULT_FILE_NAME
        self.eval_file = Path(eval_file).expanduser() if eval_file else None
        for path, what in ((self.data_file, "data_file"), (self.eval_file, "eval_file")):
            if path is not None and not path.is_file():
                raise _missing_file_error(path, f"{what} not found")
        n_valid = n_seen if n_valid is None else n_valid
        if any(n is not None and n < 0 for n in (n_train, n_seen, n_unseen, n_valid)) or max_steps < 1:
            raise EnvError("hotpotqa: n_train / n_valid / n_seen / n_unseen must be >= 0 and max_steps >= 1")
        self.counts: dict[str, int | None] = {"train": n_train, "valid": n_valid, "seen": n_seen, "unseen": n_unseen}
        if isinstance(unseen_ids, str):
            if unseen_ids != "reflexion":
                raise EnvError(f"hotpotqa: unseen_ids={unseen_ids!r}: give a list of HotpotQA _ids or 'reflexion'")
            unseen_ids = REFLEXION_DEV_IDS
        self.unseen_ids = list(unseen_ids) if unseen_ids is not None else None
        self.max_steps = max_steps
        self._questions: dict[str, dict[str, Any]] | None = None  # task id -> question
        self._tasks: dict[str, list[Task]] = {}
        self._index: dict[str, Task] = {}
        self._q: dict[str, Any] = {}
        self._page: list[str] | None = None  # sentences of the last searched paragraph
        self._lookup: tuple[str, list[str], int] | None = None  # keyword, matching sentences, next index
        self._over = False
        self._last = StepInfo(0.0, False, False)

    # -- task lists -------------------------------------------------------------------------------------------
    def _cache_file(self) -> Path:
        files = [self.data_file] + ([self.eval_file] if self.eval_file else [])
        key = json.dumps({"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
                          "counts": self.counts, "unseen_ids": self.unseen_ids, "v": _CACHE_VERSION}, sort_keys=True)
        return self.cache_dir / "hotpotqa" / f"split-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"

    def _select(self) -> dict[str, list[dict[str, Any]]]:
        """Parse the file(s) and pick each split's questions (see the module docstring)."""
        main = _read_questions(self.data_file, "data_file")
        n_train, n_seen, n_unseen = self.counts["train"], self.counts["seen"], self.counts["unseen"]
        evaluation = _read_questions(self.eval_file, "eval_file") if self.eval_file is not None else main
        if self.unseen_ids is not None:
            by_id = {q["_id"]: q for q in evaluation}
            missing = [qid for qid in self.unseen_ids if qid not in by_id]
            if missing:
                where = "eval_file" if self.eval_file is not None else "data_file"
                raise EnvError(f"hotpotqa: {len(missing)} of the {len(self.unseen_ids)} unseen_ids (e.g. "
                               f"{missing[0]}) are not in the {where}; 'reflexion' needs the distractor dev file "
                               f"({DEV_URL})")
            unseen = [by_id[qid] for qid in dict.fromkeys(self.unseen_ids)][:n_unseen]
        else:
            unseen = _by_hash(evaluation)[:n_unseen]
        # the eval file's questions never train; with one file, the unseen ones are kept out of the others
        held_out = {q["_id"] for q in (evaluation if self.eval_file is not None else unseen)}
        rest = _by_hash(main, exclude=held_out)
        seen, rest = rest[:n_seen], rest[n_seen:]
        train, valid = split_off_valid(rest, n_train, self.counts["valid"])
        return {"train": [_compact(q) for q in train], "valid": [_compact(q) for q in valid],
                "seen": [_compact(q) for q in seen], "unseen": [_compact(q) for q in unseen]}

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._questions is None:
            path = self._cache_file()
            splits = read_json(path)
            if splits is None:
                with file_lock(path.parent / ".lock"):
                    splits = read_json(path)
                    if splits is None:
                        splits = self._select()
                        write_json_atomic(path, splits)
            self._questions = {}
            for split in SPLITS:
                self._tasks[split] = []
                for q in splits[split]:
                    task = Task(f"hotpotqa:{q['_id']}", split, self.max_steps, str(q.get("type") or "hotpotqa"))
                    self._tasks[split].append(task)
                    self._questions[task.task_id] = q
            self._index = {t.task_id: t for ts in self._tasks.values() for t in ts}
        return self._questions

    def prepare(self) -> None:
        """Parse the file(s) and write the split cache once, before many workers read it."""
        self._load()

    def tasks(self, split: str) -> list[Task]:
        check_split(split)
        self._load()
        return list(self._tasks[split])

    def task(self, task_id: str) -> Task:
        self._load()
        if task_id not in self._index:
            raise EnvError(f"unknown task {task_id!r} for env 'hotpotqa' (ids look like hotpotqa:<HotpotQA _id>, "
                           f"from {self.data_file})")
        return self._index[task_id]

    def expert_actions(self, task_id: str) -> list[str]:
        q = self._load()[self.task(task_id).task_id]
        titles: list[str] = []
        for title, _sentence in q.get("supporting_facts") or []:
            if title not in titles:
                titles.append(title)
        return [f"search[{t}]" for t in titles] + [f"finish[{q['answer']}]"]

    # -- the tools -------------------------------------------------------------------------------------------
    def _paragraphs(self) -> list[tuple[str, list[str]]]:
        return [(str(title), [str(s).strip() for s in sentences if str(s).strip()])
                for title, sentences in self._q.get("context") or []]

    def _find(self, entity: str) -> list[str] | None:
        """The sentences of the paragraph the entity names: exact title, then normalised, then fuzzy."""
        paragraphs = self._paragraphs()
        for key in (_title_key, normalize_answer):
            wanted = key(entity)
            for title, sentences in paragraphs:
                if key(title) == wanted and wanted:
                    return sentences
        keys = [normalize_answer(title) for title, _ in paragraphs]
        close = difflib.get_close_matches(normalize_answer(entity), keys, n=1, cutoff=FUZZY_CUTOFF)
        return paragraphs[keys.index(close[0])][1] if close else None

    def _similar(self, entity: str) -> list[str]:
        wanted = normalize_answer(entity)
        titles = [title for title, _ in self._paragraphs()]
        ranked = sorted(titles, key=lambda t: -difflib.SequenceMatcher(None, wanted, normalize_answer(t)).ratio())
        return ranked[:SIMILAR_TITLES]

    def _search(self, entity: str) -> str:
        sentences = self._find(entity)
        if sentences is None:
            self._page = None
            return f"Could not find [{entity}]. Similar: {self._similar(entity)}."
        self._page, self._lookup = sentences, None
        return " ".join(sentences[:SEARCH_SENTENCES])

    def _lookup_next(self, keyword: str) -> str:
        if self._page is None:
            return NO_PAGE
        if self._lookup is None or self._lookup[0] != keyword.lower():
            hits = [s for s in self._page if keyword.lower() in s.lower()]
            self._lookup = (keyword.lower(), hits, 0)
        key, hits, i = self._lookup
        if i >= len(hits):
            return NO_MORE
        self._lookup = (key, hits, i + 1)
        return f"(Result {i + 1} / {len(hits)}) {hits[i]}"

    # -- playing ---------------------------------------------------------------------------------------------
    def _reset(self, task: Task, seed: int | None) -> tuple[str, str]:
        self._q = self._load()[task.task_id]
        self._page, self._lookup, self._over = None, None, False
        self._last = StepInfo(0.0, False, True)
        return str(self._q["question"]).strip(), FIRST_OBS

    def _step(self, action: str) -> tuple[str, StepInfo, bool]:
        if self._over:
            return INVALID_ACTION_OBS, StepInfo(self._last.score, self._last.won, False), True
        line = next((ln for ln in action.splitlines() if ln.strip()), "").strip()
        match = _ACTION.match(line)
        tool = match.group(1).lower() if match else ""
        arg = match.group(2).strip() if match else ""
        if arg.endswith("]"):
            arg = arg[:-1].strip()
        if not arg or tool not in ("search", "lookup", "finish", "think"):
            return f"Invalid action: {line}", StepInfo(0.0, False, False), False
        if tool == "finish":
            won = exact_match(arg, str(self._q["answer"]))
            self._over = True
            self._last = StepInfo(1.0 if won else f1_score(arg, str(self._q["answer"])), won, True)
            return (CORRECT if won else INCORRECT), self._last, True
        if tool == "search":
            obs = self._search(arg)
        elif tool == "lookup":
            obs = self._lookup_next(arg)
        else:
            obs = THOUGHT_OBS
        return obs, StepInfo(0.0, False, True), False
