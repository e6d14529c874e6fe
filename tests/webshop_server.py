"""A small stand-in for WebShop's web server, for the webshop env's tests: WebShop's products, goals and search index
ship with WebShop's own setup (github.com/princeton-nlp/WebShop, `./setup.sh`), not with any package registry, so
the tests cannot run the real server here.

It serves the SAME routes as web_agent_site/app.py (`/<session>`, `/search_results/<session>/<keywords>/<page>`,
`/item_page/<session>/<asin>/<keywords>/<page>/<options>`, `/item_sub_page/.../<sub_page>/<options>`,
`/done/<session>/<asin>/<options>`; GET or POST; options as a Python dict literal read with ast.literal_eval;
`fixed_<n>` sessions get goal n, other sessions some goal; a missing goal or product is an HTTP 500, like the
IndexError / KeyError the Flask app raises) and pages with the element structure of its templates (search_page,
results_page, item_page, description/features/review/attributes pages, done_page: the instruction header, buttons
in forms, `a.product-link` ASINs, option `<label>`s under an `<h4>` option name, the score under "Your score (min
0.0, max 1.0)"). The markup is written here, not copied.

Simplified against the real server (web_agent_site/engine):
* search: products ranked by how many query words occur in their title / query / category (the real one is a
  Lucene BM25 index over 1k-1.18M products), at most 50 results, 10 per page (SEARCH_RETURN_N, PRODUCT_WINDOW);
* reward: WebShop's formula (goal.py get_reward): (attribute matches + option matches + price ok) /
  (attributes + options + 1), times the type reward; but attribute and option matches are exact after case and
  space folding (the real one: thefuzz token_set_ratio > 85, color normalisation), and the type reward's title
  score counts shared words of 3+ letters outside a stop list instead of spaCy's noun tags;
* goals are given, not drawn from human instructions with random price bounds.
"""

from __future__ import annotations

import ast
import html
import threading
import urllib.parse
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SEARCH_RETURN_N = 50  # engine.py
PRODUCT_WINDOW = 10  # engine.py: results per page
SUB_PAGES = ("Description", "Features", "Reviews", "Attributes")
_STOP = {"and", "for", "the", "with", "by", "of", "in", "to", "men", "women", "pack", "ounce", "natural"}


@dataclass
class Product:
    asin: str
    title: str
    price: float
    category: str
    query: str
    product_category: str  # "A › B › C", as in WebShop's data
    name: str  # the product type the type reward compares
    options: dict[str, list[str]] = field(default_factory=dict)
    attributes: list[str] = field(default_factory=list)
    description: str = ""
    bullet_points: list[str] = field(default_factory=list)
    reviews: list[dict[str, Any]] = field(default_factory=list)  # {title, score, body}
    rating: str = "N.A."


@dataclass
class Goal:
    asin: str
    instruction_text: str
    attributes: list[str]
    goal_options: list[str]
    price_upper: float


# -- WebShop's reward (goal.py), simplified where the module docstring says --------------------------------------
def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


def _type_words(name: str) -> set[str]:
    words = "".join(ch if ch.isalnum() else " " for ch in name.lower()).split()
    return {w for w in words if len(w) >= 3 and w not in _STOP}


def type_reward(product: Product, goal_product: Product) -> float:
    query_match = product.query == goal_product.query
    cats = {c.strip() for c in product.product_category.split("›")}
    goal_cats = {c.strip() for c in goal_product.product_category.split("›")}
    category_match = len(cats & goal_cats) >= 2
    desired = _type_words(goal_product.name)
    title_score = len(_type_words(product.name) & desired) / len(desired) if desired else 0.2
    r_type = 1.0 if (query_match or category_match or title_score > 0.2) else 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type


def reward(product: Product, goal: Goal, goal_product: Product, options: dict[str, str]) -> float:
    text = " ".join([product.title, " ".join(product.bullet_points), product.description]).lower()
    attr_matches = sum(
        1 for a in goal.attributes
        if any(_fold(a) == _fold(p) for p in product.attributes) or a.lower() in text
    )
    chosen = {_fold(v) for v in options.values()}
    option_matches = sum(1 for o in goal.goal_options if _fold(o) in chosen)
    price_ok = product.price <= goal.price_upper
    total = (attr_matches + option_matches + price_ok) / (len(goal.attributes) + len(goal.goal_options) + 1)
    return total * type_reward(product, goal_product)


# -- pages: the element structure of WebShop's templates ------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value))  # Flask's render_template_string autoescapes


def _url(*parts: Any) -> str:
    return "/" + "/".join(urllib.parse.quote(str(p), safe="") for p in parts)


def _doc(body: str) -> str:
    return ("<!DOCTYPE html>\n<html>\n  <head>\n    <link rel=\"stylesheet\" href=\"/static/style.css\">\n"
            "    <script>var unused = 'not visible';</script>\n  </head>\n  <body>\n"
            f"    <div class=\"container py-5\">\n{body}\n    </div>\n  </body>\n</html>")


def _instruction(text: str, space: str = "") -> str:
    return (f"      <div class=\"row top-buffer\"><div class=\"col-sm-6\"><div id=\"instruction-text\" "
            f"class=\"text-center\">\n        <h4>Instruction:{space}<br>{_e(text)}</h4>\n      </div></div></div>")


def _button(action: str, label: str, cls: str = "btn btn-primary") -> str:
    return (f"      <div class=\"row top-buffer\">\n        <form method=\"post\" action=\"{_e(action)}\">\n"
            f"          <button type=\"submit\" class=\"{cls}\">{_e(label)}</button>\n        </form>\n      </div>")


def search_page(session: str, instruction: str) -> str:
    return _doc(
        "      <div id=\"logo\" class=\"text-center\"><h2>WebShop</h2></div>\n"
        + _instruction(instruction, " ") + "\n"
        f"      <form role=\"form\" id=\"form-buscar\" method=\"post\" action=\"{_url(session)}\">\n"
        "        <div class=\"input-group\">\n"
        "          <input id=\"search_input\" class=\"form-control\" type=\"text\" name=\"search_query\" "
        "placeholder=\"Search...\" required/>\n"
        "          <span class=\"input-group-btn\"><button class=\"btn btn-success\" type=\"submit\">"
        "<i class=\"glyphicon glyphicon-search\" aria-hidden=\"true\"></i>Search</button></span>\n"
        "        </div>\n      </form>")


def results_page(session: str, instruction: str, keywords: str, page: int, products: list[Product],
                 total: int) -> str:
    nav = ""
    if page > 1:
        nav += _button(_url("search_results", session, keywords, page - 1), "< Prev") + "\n"
    nav += _button(_url("search_results", session, keywords, page + 1), "Next >")
    items = []
    for p in products:
        link = _url("item_page", session, p.asin, keywords, page, "{}")
        # results_page.html closes these <h4>s with </h5> (and the price <h5> with </h6>): kept, parsers must cope
        items.append(
            "        <div class=\"col-lg-12 mx-auto list-group-item\">\n"
            f"          <img src=\"/img/{_e(p.asin)}.jpg\" class=\"result-img\">\n"
            "          <div class=\"media-body order-2 order-lg-1 searched-product\">\n"
            f"            <h4 class=\"mt-0 font-weight-bold mb-2 product-asin\"><a class=\"product-link\" "
            f"href=\"{_e(link)}\">{_e(p.asin)}</a></h5>\n"
            f"            <h4 class=\"mt-0 font-weight-bold mb-2 product-title\">{_e(p.title)}</h5>\n"
            f"            <h5 class=\"font-weight-bold my-2 product-price\">${p.price:.2f}</h6>\n"
            f"<!--\n            <h5 class=\"product-category\">{_e(p.category)}</h5>\n-->\n"
            "          </div>\n        </div>")
    return _doc(
        _instruction(instruction) + "\n" + _button(_url(session), "Back to Search", "btn btn-success") + "\n"
        f"      <div class=\"display-4\"><h3>Page {page} (Total results: {total})</h3></div>\n"
        + nav + "\n" + "\n".join(items))


def item_page(session: str, instruction: str, p: Product, keywords: str, page: int, options: dict[str, str],
              show_attrs: bool) -> str:
    blocks = []
    for name, values in p.options.items():
        radios = []
        for i, value in enumerate(values):
            url = _url("item_page", session, p.asin, keywords, page, str({**options, name: value}))
            radios.append(f"            <input type=\"radio\" id=\"radio_{_e(name)}{i}\" name=\"{_e(name)}\" "
                          f"value=\"{_e(value)}\" data-url=\"{_e(url)}\">\n"
                          f"            <label for=\"radio_{_e(name)}{i}\">{_e(value)}</label>")
        blocks.append(f"        <div class=\"row top-buffer\">\n          <h4>{_e(name)}</h4>\n"
                      "          <div class=\"radio-toolbar\">\n" + "\n".join(radios) + "\n          </div>\n"
                      "        </div>")
    subs = [s for s in SUB_PAGES if show_attrs or s != "Attributes"]
    sub_buttons = "\n".join(
        f"          <div class=\"col-sm-3\" name=\"{s.lower()}\">\n"
        + _button(_url("item_sub_page", session, p.asin, keywords, page, s, str(options)), s) + "\n          </div>"
        for s in subs)
    return _doc(
        _instruction(instruction) + "\n" + _button(_url(session), "Back to Search", "btn btn-success") + "\n"
        + _button(_url("search_results", session, keywords, page), "< Prev") + "\n"
        "      <div class=\"col-md-4 mb-4 mb-md-0\">\n"
        f"        <img id=\"product-image\" src=\"/img/{_e(p.asin)}.jpg\" class=\"item-page-img\">\n"
        + "\n".join(blocks) + "\n      </div>\n"
        f"      <div class=\"col-md-6\">\n        <h2>{_e(p.title)}</h2>\n        <h4>Price: ${p.price:.2f}</h4>\n"
        f"        <h4>Rating: {_e(p.rating)}</h4>\n" + sub_buttons + "\n      </div>\n"
        + _button(_url("done", session, p.asin, str(options)), "Buy Now", "btn btn-lg purchase")
        + "\n  <script>$('input:radio').each(function() { /* reload with the option */ });</script>")


def sub_page(session: str, instruction: str, p: Product, keywords: str, page: int, sub: str,
             options: dict[str, str]) -> str:
    if sub == "Description":
        content = f"<p class=\"product-info\">{_e(p.description)}</p>"
    elif sub == "Features":
        bullets = "".join(f"<li><p class=\"product-info\"> {_e(b)}</p></li>" for b in p.bullet_points)
        content = f"<ul>{bullets}</ul>"
    elif sub == "Reviews":
        content = "".join(
            f"<div class=\"card\"><h4 class=\"blue-text mt-3\">\"{_e(r['title'])}\"</h4><p class=\"text-left\">"
            f"<span>{_e(r['score'])}</span></p><p class=\"content\">{_e(r['body'])}</p></div>" for r in p.reviews)
    else:
        content = ("<ul>" + "".join(f"<li><p class=\"attribute\"> {_e(a)}</p></li>" for a in p.attributes)
                   + f"</ul><h5 class=\"product-category\">{_e(p.category)}</h5>")
    return _doc(
        _instruction(instruction) + "\n" + _button(_url(session), "Back to Search", "btn btn-success") + "\n"
        + _button(_url("item_page", session, p.asin, keywords, page, str(options)), "< Prev") + "\n"
        f"      <div class=\"card card-body\">{content}</div>")


def done_page(session: str, p: Product, goal: Goal, options: dict[str, str], score: float) -> str:
    return _doc(
        "      <div id=\"thankyou\" class=\"text-center\"><h1>Thank you for shopping with us!</h1></div>\n"
        "      <div id=\"stats\" class=\"text-center\">\n"
        f"        <h3 align=\"mturk_code\">Your code: </h3><p><pre>{zlib.crc32(session.encode()):08x}</pre></p>\n"
        "        <div style=\"display:none\">\n"
        f"          <h4 id=\"asin\">asin<pre>{_e(p.asin)}</pre></h4>\n"
        f"          <h4 id=\"options\">options<pre>{_e(options)}</pre></h4>\n"
        f"          <h4 id=\"goal-asin\">asin<pre>{_e(goal.asin)}</pre></h4>\n"
        f"          <h4 id=\"goal-instruction-text\">instuction text<pre>{_e(goal.instruction_text)}</pre></h4>\n"
        "          <h2 align=\"left\">Reward</h2>\n        </div>\n"
        f"        <h3 id=\"reward\">Your score (min 0.0, max 1.0)<pre>{score}</pre></h3>\n"
        "      </div>")


# -- the server ---------------------------------------------------------------------------------------------------
class ShopServer:
    """`with ShopServer(products, goals) as server:` serves on 127.0.0.1 at `server.url` from a thread."""

    def __init__(self, products: list[Product], goals: dict[int, Goal], show_attrs: bool = False) -> None:
        self.products = {p.asin: p for p in products}
        self.order = [p.asin for p in products]
        self.goals = goals
        self.show_attrs = show_attrs
        self.sessions: dict[str, Goal] = {}
        self.paths: list[str] = []  # every request path, to check the protocol
        self.rewards: list[float] = []
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> "ShopServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        shop = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's names
                shop._handle(self)

            do_POST = do_GET  # the Flask routes take both

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- routes (app.py) ---------------------------------------------------------------------------------------
    def _goal(self, session: str) -> Goal:
        if session not in self.sessions:
            if "fixed" in session:
                self.sessions[session] = self.goals[int(session.split("_")[-1])]  # KeyError -> 500, like IndexError
            else:
                keys = sorted(self.goals)
                self.sessions[session] = self.goals[keys[zlib.crc32(session.encode()) % len(keys)]]
        return self.sessions[session]

    def search(self, keywords: str) -> list[Product]:
        words = keywords[1:-1] if keywords.startswith("[") else keywords  # app.py reads "[...]" as a literal
        query = [w for w in words.lower().replace(",", " ").replace("'", " ").split() if w]
        scored = []
        for rank, asin in enumerate(self.order):
            p = self.products[asin]
            text = set(f"{p.title} {p.query} {p.category}".lower().replace(",", " ").split())
            hits = sum(1 for w in query if w in text)
            if hits:
                scored.append((-hits, rank, p))
        return [p for _, _, p in sorted(scored, key=lambda x: x[:2])][:SEARCH_RETURN_N]

    def _page(self, parts: list[str]) -> str:
        route = parts[0] if len(parts) > 1 else "index"
        session = parts[1] if len(parts) > 1 else parts[0]
        goal = self._goal(session)
        if route == "index":
            return search_page(session, goal.instruction_text)
        if route == "search_results":
            _, _, keywords, page = parts
            found = self.search(keywords)
            shown = found[(int(page) - 1) * PRODUCT_WINDOW:int(page) * PRODUCT_WINDOW]
            return results_page(session, goal.instruction_text, keywords, int(page), shown, len(found))
        if route == "item_page":
            _, _, asin, keywords, page, options = parts
            return item_page(session, goal.instruction_text, self.products[asin], keywords, int(page),
                             ast.literal_eval(options), self.show_attrs)
        if route == "item_sub_page":
            _, _, asin, keywords, page, sub, options = parts
            return sub_page(session, goal.instruction_text, self.products[asin], keywords, int(page), sub,
                            ast.literal_eval(options))
        if route == "done":
            _, _, asin, options = parts
            chosen = ast.literal_eval(options)
            score = reward(self.products[asin], goal, self.products[goal.asin], chosen)
            self.rewards.append(score)
            return done_page(session, self.products[asin], goal, chosen, score)
        raise KeyError(route)

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.urlsplit(request.path).path
        self.paths.append(path)
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        try:
            body, status = self._page(parts).encode(), 200
        except (KeyError, ValueError, SyntaxError, IndexError):  # what the Flask app would raise: a 500 page
            body, status = b"<html><body><h1>Internal Server Error</h1></body></html>", 500
        request.send_response(status)
        request.send_header("Content-Type", "text/html; charset=utf-8")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


# -- the catalogue the tests use ------------------------------------------------------------------------------------
DEODORANT_CATEGORY = "Beauty & Personal Care › Personal Care › Deodorants & Antiperspirants › Deodorant"
SHOE_CATEGORY = "Clothing, Shoes & Jewelry › Men › Shoes › Athletic › Running"


def catalogue() -> list[Product]:
    deo = dict(category="beauty", query="deodorant", product_category=DEODORANT_CATEGORY)
    return [
        Product("B078GWRC1J", "Bright Citrus Deodorant by Earth Mama | Natural and Safe for Sensitive Skin, "
                "Contains Organic Calendula 3-Ounce", 10.99, name="natural deodorant stick", **deo,
                options={"scent": ["assorted scents", "bright citrus", "calming lavender", "ginger fresh"],
                         "size": ["travel set (4-pack)", "3 ounce (pack of 1)", "3-ounce (2-pack)"]},
                attributes=["sensitive skin", "aluminum free"],
                description="A gentle deodorant made with organic calendula.",
                bullet_points=["Safe for sensitive skin", "No aluminum, parabens or baking soda"],
                reviews=[{"title": "Works", "score": 5, "body": "Smells like oranges."}]),
        Product("B078GTKVXY", "Ginger Fresh Deodorant by Earth Mama | Natural and Safe for Sensitive Skin 3-Ounce",
                10.99, name="natural deodorant stick", **deo,
                options={"size": ["3 ounce (pack of 1)", "3-ounce (2-pack)"]},
                attributes=["sensitive skin"], description="Ginger scented deodorant."),
        Product("B08KBVJ4XN", "Barrel and Oak - Aluminum-Free Deodorant, Deodorant for Men, Cedar & Patchouli "
                "Blend (Mountain Sage, 2.7 oz, 2-Pack)", 15.95, name="deodorant for men", **deo,
                options={"scent": ["mountain sage", "cedar"]}, attributes=["aluminum free"],
                description="Essential oil based deodorant."),
        Product("B07QXZ1111", "Lavender Deodorant Cream, Travel Size", 7.50, name="deodorant cream", **deo,
                attributes=["travel size"], description="A cream deodorant."),
        Product("B01SHOE001", "Men's Lightweight Running Shoes, Breathable Mesh Sneakers", 45.00,
                category="fashion", query="men's running shoes", product_category=SHOE_CATEGORY,
                name="running shoes", options={"color": ["black", "blue"], "size": ["9", "10", "11"]},
                attributes=["lightweight", "rubber sole"], description="Mesh running shoes."),
        Product("B01SHOE002", "Women's Trail Running Shoes, Waterproof", 70.00, category="fashion",
                query="women's trail shoes",
                product_category="Clothing, Shoes & Jewelry › Women › Shoes › Hiking",
                name="trail shoes", options={"size": ["7", "8"]}, attributes=["waterproof"]),
    ]


def goals() -> dict[int, Goal]:
    """Goal indices as the server's fixed_<n> sessions see them: test (0..), eval (500..) and train (1500..)."""
    return {
        0: Goal("B078GWRC1J", "i would like a 3 ounce bottle of bright citrus deodorant for sensitive skin, and "
                "price lower than 50.00 dollars", ["sensitive skin"], ["bright citrus", "3 ounce (pack of 1)"], 50.0),
        1: Goal("B01SHOE001", "i need lightweight men's running shoes in black, size 10, and price lower than "
                "60.00 dollars", ["lightweight"], ["black", "10"], 60.0),
        500: Goal("B078GTKVXY", "i want a ginger fresh deodorant for sensitive skin in a 3-ounce 2-pack, and price "
                  "lower than 30.00 dollars", ["sensitive skin"], ["3-ounce (2-pack)"], 30.0),
        1500: Goal("B07QXZ1111", "i am looking for a travel size lavender deodorant cream, and price lower than "
                   "20.00 dollars", ["travel size"], [], 20.0),
    }
