"""WebShop family: a client for the real WebShop web server (Yao et al. 2022, github.com/princeton-nlp/WebShop) that
the user runs; its product catalogue and goals ship with WebShop's own setup (`./setup.sh -d small|all`), not with
any package registry.

The protocol is the one ReAct's WebShop notebook and Reflexion's / Retroformer's webshop_runs/webshop_trial.py use
(`webshop_text` + `webshopEnv`): the client keeps the page state (page type, query, result page, product, chosen
options, sub-page) and GETs the server's Flask routes (web_agent_site/app.py):
`/<session>` (search page), `/search_results/<session>/<query>/<page>`,
`/item_page/<session>/<asin>/<query>/<page>/<options>`, `/item_sub_page/<session>/<asin>/<query>/<page>/<sub>/<options>`
and `/done/<session>/<asin>/<options>` (buying: the server computes the reward and shows it on the done page as
"Your score (min 0.0, max 1.0)" followed by the value). Options travel as a Python dict literal, which the server
reads with `ast.literal_eval`. Pages become text as `webshop_text` makes it: buttons `[Back to Search]`, the first 3
products of a result page as `[ASIN]` + title + price, options `[value]` (`[[value]]` once chosen); the first two
texts of a non-search page (the "Instruction:" header and the goal) are dropped. HTML is read with the standard
library's html.parser (the clients use BeautifulSoup's "html.parser" builder on the same stdlib parser).

* Actions: `search[query]` (on the search page only, as the clients assert), `click[button]` for a button, product
  ASIN or option shown on the page (case-insensitive: actions arrive lower-cased), `think[...]` ("OK."). Choosing an
  option answers "You have clicked <option>." (the clients' text). Anything else, or a click on something the page
  does not show, is the clients' "Invalid action!" with valid False and nothing changed. `click[Next >]` and
  `click[< Prev]` on result pages page through the results (the real server's routes; the ReAct client refused
  `Next >` as an "ad hoc page limitation").
* Score: WebShop's reward in [0, 1] from the done page; `won` when it is 1.0 (Reflexion / Retroformer's success);
  buying ends the episode. Reward is 1 on a win only.
* Tasks: session ids `fixed_<n>` (the clients' ids; the server maps `fixed_<n>` to its goal n after shuffling the
  goals with seed 233), task ids `webshop:fixed_<n>`. Splits follow WebShop's goal index ranges
  (baseline_models/env.py): `unseen` = test goals 0..499 (first `n_unseen`, default 100: Reflexion and Retroformer
  evaluate fixed_0..fixed_99, ReAct fixed_0..fixed_499), `seen` = WebShop's eval goals 500..1499 (first `n_seen`,
  default 100), `train` = goals 1500..4999 (first `n_train`, default 1000, at most 3500), `valid` = goals
  5000..5999 inside WebShop's train range (first `n_valid`, default None: as many as `n_seen`), which train can
  never reach (WebShop shuffles all goals with one seed before cutting its ranges, so every range is the same
  distribution). WebShop's full data has ~12k human goals, its `-d small` data fewer: a goal the server lacks is an
  EnvError at reset. `kind` = "shop" (the goal's category is only visible after buying).
* `max_steps` = 14: ReAct's notebook (webshop_run) and Retroformer's / Reflexion's webshop_trial.py loop 15 times,
  and the first pass steps the 'reset' action, so an episode gets 14 agent actions (think[...] ones included).
* No expert demos: WebShop's human demonstrations are not in any registry, so `expert_actions` raises EnvError
  ("demos: none"): evaluation (zero-shot ReAct / Reflexion) works, imitation learning does not.
* The server must be reachable at `server_url` (default http://127.0.0.1:3000); unreachable at reset or in
  `prepare()` (which also checks that the server has the first and last listed goal of each split) -> EnvError
  naming how to start it; lost mid-episode -> EnvLost (the runner replays the episode).

Standard library only (urllib, html.parser); no extra to install, nothing cached.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from .core import EnvError, EnvLost, INVALID_ACTION_OBS, StepInfo, Task, TextEnv, check_split

DEFAULT_URL = "http://127.0.0.1:3000"
DEFAULT_MAX_STEPS = 14  # 15 loop passes in the clients, the first one the reset
# WebShop's goal index ranges (baseline_models/env.py: test range(500), eval range(500, 1500), train 1500..)
# valid: a fixed block inside WebShop's train range, past the goals train may list (train's cap ends where it starts)
SPLIT_START = {"unseen": 0, "seen": 500, "train": 1500, "valid": 5000}
SPLIT_CAP = {"unseen": 500, "seen": 1000, "train": 3500, "valid": 1000}
SHOWN_PRODUCTS = 3  # webshop_text shows the first 3 products of a result page (prod_cnt >= 3 -> '')
SCORE_LABEL = "Your score (min 0.0, max 1.0)"  # done_page.html
INVALID = "Invalid action!"  # the clients' observation when their assertions fail
BUY, BACK, NEXT, PREV = "Buy Now", "Back to Search", "Next >", "< Prev"  # engine.py END_BUTTON, ...
SUB_PAGES = ("Description", "Features", "Reviews", "Attributes")  # engine.py ACTION_TO_TEMPLATE
_IGNORED_PARENTS = {"style", "script", "head", "title", "meta", "[document]"}  # webshop_text's tag_visible
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
_START_HINT = (
    "start WebShop's server (github.com/princeton-nlp/WebShop: `./setup.sh -d small` once, then `./run_dev.sh`, "
    "which serves port 3000) and name it with env.kwargs.server_url (`--set env.kwargs.server_url=http://HOST:3000`)"
)


@dataclass(frozen=True)
class _Text:
    text: str
    parent: str
    classes: tuple[str, ...]


class _VisibleTexts(HTMLParser):
    """Text nodes with their parent element, like BeautifulSoup's findAll(text=True) + tag_visible: comments and
    text under style/script/head/title/meta are dropped; an end tag with no open element of its name is ignored
    (results_page.html closes its <h4> with </h5>; bs4's html.parser builder ignores such tags too: its
    _popToTag pops nothing when no tag of that name is open).

    With convert_charrefs=True the stdlib parser hands over the text between two tags in one handle_data call
    (CPython 3.11 html/parser.py:138-161, goahead), but a stray "<" that starts no tag splits it, so data is joined
    until the next markup event: one text node, like bs4's NavigableString. A self-closing `<x/>` arrives as
    handle_starttag + handle_endtag (html/parser.py:418, handle_startendtag)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, tuple[str, ...]]] = []
        self.texts: list[_Text] = []
        self._pending: list[str] = []  # data calls since the last markup: one text node, as in bs4

    def _flush(self) -> None:
        if self._pending:
            parent, classes = self.stack[-1] if self.stack else ("[document]", ())
            if parent not in _IGNORED_PARENTS:
                self.texts.append(_Text("".join(self._pending), parent, classes))
            self._pending = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._flush()
        if tag not in _VOID:
            classes = tuple((dict(attrs).get("class") or "").split())
            self.stack.append((tag, classes))

    def handle_endtag(self, tag: str) -> None:
        self._flush()
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def handle_comment(self, data: str) -> None:
        self._flush()

    def handle_data(self, data: str) -> None:
        self._pending.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def visible_texts(html: str) -> list[_Text]:
    parser = _VisibleTexts()
    parser.feed(html)
    parser.close()
    return parser.texts


def _clean_str(text: str) -> str:
    """The clients' clean_str: undo escaped unicode in WebShop's product data; text it cannot decode stays as is."""
    try:
        return text.encode().decode("unicode-escape").encode("latin1").decode("utf-8")
    except (UnicodeError, ValueError):
        return text


@dataclass
class Page:
    observation: str
    asins: list[str] = field(default_factory=list)
    option_types: dict[str, str] = field(default_factory=dict)  # option value -> option name
    buttons: list[str] = field(default_factory=list)
    instruction: str = ""
    reward: float | None = None


def render(html: str, page_type: str, chosen: set[str] = frozenset()) -> Page:
    """`webshop_text`'s observation of a page (ReAct WebShop.ipynb / Retroformer webshop_trial.py), with its
    asins, option types and reward; `chosen` are the selected option values, shown as [[value]]."""
    page = Page("")
    parts: list[str] = []
    option_type, regular, products, since_product = "", 0, 0, 0
    texts = [t for t in visible_texts(html) if t.text.replace("\n", "").replace("\\n", "").replace(" ", "")]
    for i, t in enumerate(texts):
        if t.parent == "button":
            out = f"\n[{t.text}] "
            page.buttons.append(t.text.strip())
        elif t.parent == "label":  # an option
            out = f"[[{t.text}]]" if t.text in chosen else f"[{t.text}]"
            page.option_types[t.text] = option_type
        elif t.classes == ("product-link",):  # a product's ASIN
            out = f"\n[{t.text}] " if products < SHOWN_PRODUCTS else ""
            products += 1
            page.asins.append(t.text.strip())
            since_product = 0
        else:  # plain text; on non-search pages the first two are the "Instruction:" header and the goal
            out = f"\n{t.text} "
            if regular < 2 and page_type != "init":
                out = ""
            if since_product <= 2 and products > SHOWN_PRODUCTS:  # title and price of a product not shown
                out = ""
            if t.text.strip().startswith("Instruction:") and i + 1 < len(texts):
                page.instruction = texts[i + 1].text.strip()
            option_type = t.text
            regular += 1
        since_product += 1
        parts.append(out)
    page.observation = _clean_str("".join(parts))
    values = [t.text.strip() for t in texts]
    if SCORE_LABEL in values and values.index(SCORE_LABEL) + 1 < len(values):
        raw = values[values.index(SCORE_LABEL) + 1]
        try:
            page.reward = float(raw)
        except ValueError:
            page.reward = 0.0
        page.observation = f"{SCORE_LABEL}: {raw}"
    return page


def _match(name: str, candidates: list[str]) -> str | None:
    """The candidate a (lower-cased) click names, compared case-insensitively with spaces collapsed."""
    key = " ".join(name.split()).casefold()
    return next((c for c in candidates if " ".join(c.split()).casefold() == key), None)


class WebShopEnv(TextEnv):
    family = "webshop"
    needs = "a running WebShop server (env.kwargs.server_url)"
    data = ("the user's WebShop server: goals fixed_<n> (test 0-499 = unseen, eval 500-1499 = seen, train 1500-4999, "
            "valid 5000-5999 from WebShop's train range); expert demos: none")
    has_demos = False

    def __init__(
        self,
        server_url: str = DEFAULT_URL,
        n_train: int = 1000,
        n_seen: int = 100,
        n_unseen: int = 100,
        n_valid: int | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        timeout_s: float = 30.0,
    ) -> None:
        super().__init__()
        self.server_url = server_url.rstrip("/")
        self.counts = {"train": n_train, "valid": n_seen if n_valid is None else n_valid, "seen": n_seen,
                       "unseen": n_unseen}
        for split, n in self.counts.items():
            cap = SPLIT_CAP[split]
            if not 0 <= n <= cap:
                raise EnvError(f"webshop: n_{split} must be in [0, {cap}] (the goal range for {split} is "
                               f"fixed_{SPLIT_START[split]}..fixed_{SPLIT_START[split] + cap - 1})")
        if max_steps < 1:
            raise EnvError("webshop: max_steps must be >= 1")
        self.max_steps = max_steps
        self.timeout_s = timeout_s
        self._tasks = {split: [Task(f"webshop:fixed_{SPLIT_START[split] + i}", split, max_steps, "shop")
                               for i in range(n)] for split, n in self.counts.items()}
        self._index = {t.task_id: t for ts in self._tasks.values() for t in ts}
        self._state: dict[str, Any] = {}
        self._page = Page("")
        self._over = False
        self._last = StepInfo(0.0, False, False)

    # -- tasks -----------------------------------------------------------------------------------------------
    def tasks(self, split: str) -> list[Task]:
        check_split(split)
        return list(self._tasks[split])

    def task(self, task_id: str) -> Task:
        if task_id not in self._index:
            raise EnvError(f"unknown task {task_id!r} for env 'webshop' (ids look like webshop:fixed_0; this env "
                           f"lists {self.counts} tasks per split)")
        return self._index[task_id]

    def expert_actions(self, task_id: str) -> list[str]:
        self.task(task_id)
        raise EnvError("webshop has no expert demos: WebShop's human demonstrations ship with its own data, not "
                       "with any package registry (demos: none); use it with `retrorl eval`")

    def prepare(self) -> None:
        """Check, once before workers start, that the server answers and has the goals of the first and last
        listed tasks (EnvError naming the fix otherwise)."""
        listed = [ts for ts in self._tasks.values() if ts]
        for task in dict.fromkeys(t for ts in listed for t in (ts[0], ts[-1])):
            self._open(task)

    # -- HTTP --------------------------------------------------------------------------------------------------
    def _url(self, s: dict[str, Any]) -> str:
        def seg(value: Any) -> str:
            return urllib.parse.quote(str(value), safe="")

        session, kind = seg(s["session"]), s["page_type"]
        if kind == "init":
            return f"{self.server_url}/{session}"
        query, page = seg(s["query"]), seg(s["page_num"])
        if kind == "search":
            return f"{self.server_url}/search_results/{session}/{query}/{page}"
        asin, options = seg(s["asin"]), seg(s["options"])  # str(dict): the server's literal_eval reads it
        if kind == "item":
            return f"{self.server_url}/item_page/{session}/{asin}/{query}/{page}/{options}"
        if kind == "item_sub":
            return f"{self.server_url}/item_sub_page/{session}/{asin}/{query}/{page}/{seg(s['subpage'])}/{options}"
        return f"{self.server_url}/done/{session}/{asin}/{options}"

    def _get(self, state: dict[str, Any]) -> Page:
        """Fetch and render the page of `state`. Raises urllib.error.HTTPError for a server error (an invalid
        page), OSError when the server cannot be reached."""
        with urllib.request.urlopen(self._url(state), timeout=self.timeout_s) as response:
            html = response.read().decode("utf-8", errors="replace")
        return render(html, state["page_type"], set(state.get("options", {}).values()))

    # -- playing -----------------------------------------------------------------------------------------------
    def _open(self, task: Task) -> tuple[dict[str, Any], Page]:
        """The search page of the task's session."""
        session = task.task_id.split(":", 1)[1]
        state = {"session": session, "page_type": "init"}
        try:
            return state, self._get(state)
        except urllib.error.HTTPError as e:
            raise EnvError(f"the WebShop server at {self.server_url} could not start session {session} (HTTP "
                           f"{e.code}): its goal list may be shorter than {session} (WebShop's `-d small` data "
                           "has fewer goals); use fewer tasks (env.kwargs.n_train / n_valid / n_seen / n_unseen)"
                           ) from e
        except OSError as e:
            raise EnvError(f"cannot reach a WebShop server at {self.server_url} ({e}); {_START_HINT}") from e

    def _reset(self, task: Task, seed: int | None) -> tuple[str, str]:
        state, page = self._open(task)
        self._state, self._page, self._over = state, page, False
        self._last = StepInfo(0.0, False, True)
        # the search page shows "WebShop", "Instruction:", the goal, [Search]; the goal is the instruction
        first = "\n".join(ln.strip() for ln in page.observation.splitlines()
                          if ln.strip() and ln.strip() not in ("Instruction:", page.instruction))
        return page.instruction, first

    def _next_state(self, action: str) -> tuple[dict[str, Any], str | None] | None:
        """The page state an action leads to and an observation replacing the page's, or None if invalid (the
        clients' webshopEnv.step assertions)."""
        s, kind = self._state, self._state["page_type"]
        tool, _, rest = action.partition("[")
        tool, arg = tool.strip().lower(), rest[:-1].strip() if rest.endswith("]") else rest.strip()
        if tool == "search" and kind == "init" and arg:
            # "/" would split the URL path (the server decodes %2F before routing); keywords are words anyway
            query = arg.replace("/", " ").lstrip("[")
            return {"session": s["session"], "page_type": "search", "query": query, "page_num": 1}, None
        if tool != "click" or not arg:
            return None
        if _match(arg, [BUY]) and kind == "item":
            return {**s, "page_type": "end"}, None
        if _match(arg, [BACK]) and kind in ("search", "item", "item_sub"):
            return {"session": s["session"], "page_type": "init"}, None
        if _match(arg, [NEXT]) and kind == "search" and NEXT in self._page.buttons:
            return {**s, "page_num": s["page_num"] + 1}, None
        if _match(arg, [PREV]):
            if kind == "item_sub":
                return {**s, "page_type": "item"}, None
            if kind == "item":
                return {**s, "page_type": "search", "options": {}}, None
            if kind == "search" and s["page_num"] > 1:
                return {**s, "page_num": s["page_num"] - 1}, None
            return None
        sub = _match(arg, [b for b in self._page.buttons if b in SUB_PAGES])
        if sub and kind == "item":
            return {**s, "page_type": "item_sub", "subpage": sub}, None
        if kind == "search":
            asin = _match(arg, self._page.asins)
            return ({**s, "page_type": "item", "asin": asin, "options": {}}, None) if asin else None
        if kind == "item":
            value = _match(arg, list(self._page.option_types))
            if value is None:
                return None
            options = {**s.get("options", {}), self._page.option_types[value]: value}
            return {**s, "options": options}, f"You have clicked {value}."
        return None

    def _step(self, action: str) -> tuple[str, StepInfo, bool]:
        if self._over:
            return INVALID_ACTION_OBS, StepInfo(self._last.score, self._last.won, False), True
        line = next((ln for ln in action.splitlines() if ln.strip()), "").strip()
        if line.lower().startswith("think[") or line.lower().startswith("think ["):
            return "OK.", StepInfo(0.0, False, True), False
        move = self._next_state(line)
        if move is None:
            return INVALID, StepInfo(0.0, False, False), False
        state, replacement = move
        try:
            page = self._get(state)
        except urllib.error.HTTPError:  # the server rejected the page (e.g. an option it cannot parse)
            return INVALID, StepInfo(0.0, False, False), False
        except OSError as e:
            raise EnvLost(f"the WebShop server at {self.server_url} stopped answering ({e}); {_START_HINT}") from e
        self._state, self._page = state, page
        if state["page_type"] == "end":
            reward = min(1.0, max(0.0, page.reward or 0.0))
            self._over = True
            self._last = StepInfo(reward, reward >= 1.0, True)
            return page.observation, self._last, True
        return (replacement or page.observation.strip()), StepInfo(0.0, False, True), False
