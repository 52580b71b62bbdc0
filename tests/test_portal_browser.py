"""The portal in a real browser: Playwright driving Debian's headless Chromium against `loraplex serve` on the
default model (governance, collections and fine-tuning on). The tests run in order and share the server:
the first creates the first admin key through the open-access banner, later ones use it.

Every test ends by checking that no `<script>`/`onerror=` payload typed or uploaded along the way ran, and
that the payloads show as text. Screenshots of each page, at 1280x800 and phone width, are saved under
test-artifacts/portal/ (or $LORAPLEX_TEST_ARTIFACTS).
"""

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.serve_helpers import MODEL, Server, small_config
from tests.test_rag_core import _tiny_pdf
from training.testing import qa_records

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ART = Path(os.environ.get("LORAPLEX_TEST_ARTIFACTS", REPO / "test-artifacts")) / "portal"
CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
# Each payload would set window.__xss if any page parsed it as HTML (the CSP blocks inline code too; the
# checks below also look for the elements a parse would have made).
XSS_NAME = '<img src=x onerror="window.__xss=1">'
XSS_TEXT = "<script>window.__xss=2</script>"
XSS_META = '"><svg onload="window.__xss=3">'
STATE: dict = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("portal")
    cfg = small_config({}, embeddings={"enabled": True}, rag={"enabled": True}, fine_tuning={"enabled": True},
                       governance={"enabled": True, "teams": {"apps": {"budget": {"amount_usd": 5, "period": "month"}}}})
    srv = Server(tmp, cfg).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: install Debian's `chromium` (.ci/run does) to run the browser tests")
    from playwright.sync_api import sync_playwright

    ART.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


class Tab:
    """One browser context (its own sessionStorage, so its own sign-in) and page, with the XSS tripwires."""

    def __init__(self, browser, base: str, width: int = 1280, height: int = 800):
        self.ctx = browser.new_context(viewport={"width": width, "height": height})
        self.ctx.add_init_script("window.__xss = 0; window.__drawn = []; const fillText = CanvasRenderingContext2D.prototype"
                                 ".fillText; CanvasRenderingContext2D.prototype.fillText = function (t, ...a) {"
                                 " window.__drawn.push(String(t)); return fillText.call(this, t, ...a); };")
        self.page = self.ctx.new_page()
        self.base = base
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _dialog(self, d):
        if d.type != "confirm":  # our revoke/delete confirmations are expected; alert() would be a payload
            self.dialogs.append(d.message)
        d.accept()

    def go(self, view: str = "catalog"):
        url = f"{self.base}/ui/#/{view}"
        same = self.page.url == url
        self.page.goto(url)
        if same:  # a hash the page is at already: no navigation happens, so load the view afresh
            self.page.reload()
        self.page.wait_for_selector("main h1")
        return self.page

    def sign_in(self, key: str):
        self.page.goto(f"{self.base}/ui/")
        self.page.fill("#api-key", key)
        self.page.click("#sign-in")
        self.page.wait_for_selector("#nav a", state="attached")  # folded away on a phone

    def shot(self, name: str):
        self.page.screenshot(path=str(ART / f"{name}.png"), full_page=True)

    def check_clean(self):
        p = self.page
        assert p.evaluate("window.__xss") == 0, "a payload ran"
        assert p.locator("img[src='x']").count() == 0 and p.locator("main svg").count() == 0
        assert self.dialogs == [] and self.errors == [], (self.dialogs, self.errors)

    def close(self):
        self.check_clean()
        self.ctx.close()


def admin_tab(browser, server, **kw) -> Tab:
    t = Tab(browser, server.base, **kw)
    t.sign_in(STATE["admin_key"])
    return t


def eventually(check, timeout: float = 30):
    """Poll a condition on the page (wait_for_function would eval a string: the portal's CSP forbids that)."""
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "the page never got there"
        time.sleep(0.2)


def http(server, key):
    return httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_open_access_banner_creates_the_first_admin_key_shown_once(browser, server):
    t = Tab(browser, server.base)
    page = t.go()
    assert "no API keys exist yet" in page.inner_text("#banner")
    page.click("#first-key")
    secret = page.inner_text("code.secret")
    assert re.fullmatch(r"lpx-[0-9a-f]{12}[A-Za-z0-9_-]{32,}", secret)
    t.shot("first-key")
    page.get_by_role("button", name="I saved it: sign in with it").click()
    page.wait_for_selector("#who:has-text('first-admin')")  # signed in as the new key, not anonymous
    assert page.locator("#nav a[data-view=admin]").count() == 1 and page.locator("#banner").is_hidden()
    assert secret not in page.content()  # gone from the page once acknowledged
    # held in this tab's session only: not in the URL, not in a cookie
    assert secret not in page.url and page.evaluate("document.cookie") == ""
    assert page.evaluate("sessionStorage.getItem('loraplex.key')") == secret
    assert httpx.get(server.base + "/v1/models").status_code == 401  # keys exist now: open access has ended
    STATE["admin_key"] = secret
    t.close()


def test_catalog_lists_the_model_with_price_context_and_snippets(browser, server):
    t = admin_tab(browser, server)
    page = t.go("catalog")
    card = page.locator(f".card[data-model='{MODEL}']")
    card.wait_for()
    text = card.inner_text()
    cat = {m["id"]: m for m in http(server, STATE["admin_key"]).get("/v1/catalog").json()["data"]}[MODEL]
    assert f"{cat['max_model_len']:,} tokens" in text and cat["price"]["input_per_1m"] > 0
    assert "TTFT p50 / p99" in text and "replica(s)" in text
    card.locator("summary").click()
    assert f'model="{MODEL}"' in card.inner_text() and "curl " in card.inner_text()
    t.shot("catalog-1280")
    t.close()


def _send(page, text: str):
    page.fill("#pg-input", text)
    page.evaluate("""() => {  // count the DOM updates of the answer: a streamed answer grows in steps
        window.__updates = 0;
        new MutationObserver(() => { window.__updates++; }).observe(document.getElementById('pg-log'),
            {childList: true, subtree: true, characterData: true});
    }""")
    n = page.locator(".msg.assistant").count()
    page.click("#pg-send")
    answer = page.locator(".msg.assistant").nth(n)
    answer.locator(".meta .cost").wait_for(timeout=120_000)
    return answer


def test_playground_streams_an_answer_with_ttft_tokens_and_the_cost_charged(browser, server):
    t = admin_tab(browser, server)
    page = t.go("playground")
    page.fill("#pg-max-tokens", "24")
    before = http(server, STATE["admin_key"]).get("/v1/usage", params={"group_by": "key_id"}).json()["total_cost_usd"]
    answer = _send(page, "Name three colours. " + XSS_TEXT)
    assert page.evaluate("window.__updates") > 3, "the answer did not arrive in several steps"
    assert XSS_TEXT in page.locator(".msg.user").last.inner_text()  # shown as the text it is
    meta = answer.locator(".meta").inner_text()
    m = re.search(r"(\d+) prompt \+ (\d+) completion tokens", meta)
    assert m and int(m[2]) > 0 and f"model {MODEL}" in meta and re.search(r"TTFT \d", meta)
    shown = float(re.search(r"cost \$([0-9.e-]+)", meta)[1])
    after = http(server, STATE["admin_key"]).get("/v1/usage", params={"group_by": "key_id"}).json()["total_cost_usd"]
    assert shown == pytest.approx(after - before, rel=1e-3)  # what the page says is what the gateway charged
    assert answer.locator(".answer").inner_text().strip()
    t.shot("playground-1280")

    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer"}}, "required": ["colour", "count"],
              "additionalProperties": False}
    page.fill("#pg-schema", json.dumps(schema))
    page.fill("#pg-max-tokens", "40")
    typed = _send(page, "Pick a colour and a number.")
    jsonschema.validate(json.loads(typed.locator(".answer").inner_text()), schema)  # constrained by the grammar
    t.close()


def test_admin_creates_a_key_sees_it_once_and_its_spend_rises(browser, server):
    t = admin_tab(browser, server)
    page = t.go("admin")
    page.fill("#key-name", XSS_NAME)
    page.fill("#key-team", "apps")
    page.fill("#key-budget", "1.5")
    page.click("#key-create")
    secret = page.inner_text("#key-out code.secret")
    assert secret.startswith("lpx-")
    page.get_by_role("button", name="I saved it").click()
    assert secret not in page.content()
    page.locator("#key-list .tabulator-cell").get_by_text(XSS_NAME, exact=True).wait_for()  # the name, as text
    t.go("admin?tab=teams")
    page.wait_for_selector(".tabulator-cell:text-is('apps')")
    assert secret not in page.content()
    key_id = next(k["id"] for k in http(server, STATE["admin_key"]).get("/v1/admin/keys").json()["data"]
                  if k["name"] == XSS_NAME)
    STATE.update(user_key=secret, user_id=key_id)

    def spend_total():
        t.go("spend")
        page.wait_for_selector("#spend-total")
        return float(page.inner_text("#spend-total").lstrip("$"))

    start = spend_total()
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=secret, max_retries=0)
    for i in range(3):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                                       max_tokens=16)
    page.select_option("#spend-group", "key_id")
    page.wait_for_selector(f".tabulator-cell:text-is('{key_id}')")
    total = spend_total()
    assert total > start
    assert page.inner_text("#spend-total") in page.evaluate("window.__drawn")  # today's bar is labelled with its total
    page.select_option("#spend-group", "key_id")
    page.locator(".tabulator-cell").get_by_text(XSS_NAME, exact=True).first.wait_for()  # names beside ids, as text
    assert page.locator("text=Budget burn-down").count() == 1 and page.locator(".chart canvas").count() >= 3
    with page.expect_download() as dl:
        page.locator(".table-tools button").first.click()
    csv = Path(dl.value.path()).read_text()
    assert key_id in csv and "cost" in csv.splitlines()[0]
    t.shot("spend-1280")
    t.close()


def test_a_user_key_gets_no_admin_data(browser, server):
    t = Tab(browser, server.base)
    t.sign_in(STATE["user_key"])
    page = t.page
    assert page.locator("#nav a[data-view=admin]").count() == 0
    assert page.locator("#nav a[data-view=fine-tuning]").count() == 0
    t.go("admin")
    page.wait_for_selector(".error")
    assert "needs the admin role" in page.inner_text(".error")
    status = page.evaluate("""async (key) => (await fetch('/v1/admin/audit', {headers: {Authorization: 'Bearer ' + key}})).status""",
                           STATE["user_key"])
    assert status == 403  # the server refuses, whatever the page shows
    t.go("spend")
    page.wait_for_selector("#spend-total")
    assert STATE["user_id"] in page.inner_text("main")  # its own budget burn-down: the user's key only
    t.shot("user-admin-denied")
    t.close()


def test_admin_sets_a_team_budget_the_gateway_enforces_then_resets_it(browser, server):
    """The teams tab edits `apps` (budget 5/month in the config) to $0 a day: the team's key is refused at once;
    reset returns it to the config's budget and it is served again."""
    t = admin_tab(browser, server)
    page = t.go("admin?tab=teams")
    row = page.locator("#team-list .tabulator-row").filter(has=page.locator(".tabulator-cell:text-is('apps')"))
    row.locator("[data-edit-team]").click()
    assert page.input_value("#team-name") == "apps" and page.input_value("#team-budget") == "5"
    page.fill("#team-budget", "0")
    page.select_option("#team-period", "day")
    page.fill("#team-rpm", "600")
    page.click("#team-save")
    page.wait_for_selector("#team-out .ok")
    eventually(lambda: "set by" in row.inner_text() and "rpm 600" in row.inner_text() and "/ day" in row.inner_text())
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=STATE["user_key"], max_retries=0)
    ask = lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    with pytest.raises(openai.RateLimitError) as refused:
        ask()
    assert refused.value.code == "insufficient_quota" and "team apps" in refused.value.message
    t.shot("admin-teams-edited")
    page.click("#team-reset")
    eventually(lambda: "back to its config policy" in page.inner_text("#team-out"))
    eventually(lambda: "set by" not in row.inner_text() and "/ month" in row.inner_text())
    assert page.input_value("#team-budget") == "5" and page.input_value("#team-rpm") == ""
    assert ask().choices[0].message.content is not None
    t.close()


def test_collection_upload_chunks_query_and_a_cited_answer(browser, server, tmp_path):
    t = admin_tab(browser, server)
    page = t.go("collections")
    page.fill("#coll-name", "handbook")
    page.click("#coll-create")
    page.wait_for_selector("#coll-file")
    doc = tmp_path / "holidays.md"
    doc.write_text("# Holidays\n\nStaff at Acme get 31 days of paid holiday each year. " + XSS_TEXT + "\n\n"
                   "# Parking\n\nThe car park opens at 6am. " + XSS_NAME + "\n")
    pdf, html = tmp_path / "warranty.pdf", tmp_path / "parking.html"
    pdf.write_bytes(_tiny_pdf("The warranty lasts two years."))
    html.write_text("<html><body><h1>Bikes</h1><p>Bike racks are by gate B.</p><script>window.__xss=1</script></body></html>")
    page.set_input_files("#coll-file", [str(doc), str(pdf), str(html)])
    page.click("#coll-upload")
    page.wait_for_selector("text=Added 3 document(s).")
    # metadata a user set through the API is shown escaped too
    http(server, STATE["admin_key"]).post("/v1/collections/handbook/documents", json={"documents": [
        {"id": "meta-doc", "text": "Visitors sign in at reception.", "metadata": {"owner": XSS_META}}]}).raise_for_status()
    t.go("collections?name=handbook")
    doc_cell = page.locator(".tabulator-cell[tabulator-field=id]:text-is('holidays.md')")
    doc_cell.wait_for()
    meta = json.dumps({"owner": XSS_META}, separators=(",", ":"))
    assert page.locator(".tabulator-cell").get_by_text(meta, exact=True).count() == 1
    for name, text in (("warranty.pdf", "The warranty lasts two years."), ("parking.html", "Bike racks are by gate B.")):
        page.locator(f".tabulator-cell[tabulator-field=id]:text-is('{name}')").click()
        eventually(lambda: text in page.inner_text("#coll-chunks"))
        assert "window.__xss" not in page.inner_text("#coll-chunks")  # the html's script is dropped, not shown
    doc_cell.click()
    eventually(lambda: XSS_TEXT in page.inner_text("#coll-chunks"))
    assert XSS_TEXT in page.inner_text("#coll-chunks")
    page.fill("#coll-query", "How many days of holiday?")
    page.click("#coll-ask")
    page.wait_for_selector("#coll-hits .chunk")
    assert re.search(r"score 0\.\d{4}", page.inner_text("#coll-hits")) and "31 days" in page.inner_text("#coll-hits")
    t.shot("collections-1280")

    page = t.go("playground")
    page.select_option("#pg-collection", "handbook")
    page.fill("#pg-max-tokens", "24")
    answer = _send(page, "How many days of paid holiday do staff get?")
    link = answer.locator(".cites a").first
    link.wait_for()
    assert "holidays.md" in link.inner_text()
    link.click()
    page.wait_for_selector("#coll-chunks .chunk.hit")
    assert "holiday" in page.inner_text("#coll-chunks .chunk.hit").lower()
    page.click("#coll-delete")  # confirmed by the dialog handler
    page.wait_for_selector("#coll-detail:empty", state="attached")
    assert http(server, STATE["admin_key"]).get("/v1/collections/handbook").status_code == 404
    t.close()


def test_fine_tune_from_the_portal_to_a_promoted_served_adapter(browser, server, tmp_path):
    t = admin_tab(browser, server)
    page = t.go("fine-tuning")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(qa_records(1)[0]) + "\n{oops\n")
    page.set_input_files("#ft-file", str(bad))
    page.click("#ft-upload")
    page.wait_for_selector("#ft-upload-out .error")
    assert "bad.jsonl:2" in page.inner_text("#ft-upload-out .error")
    assert http(server, STATE["admin_key"]).get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing started
    good = tmp_path / "codes.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in qa_records(8)))
    page.set_input_files("#ft-file", str(good))
    page.click("#ft-upload")
    page.wait_for_selector("#ft-upload-out .ok")

    page.wait_for_selector("#ft-config-check .ok")
    config = page.input_value("#ft-config")
    page.fill("#ft-config", config + "lora_rr: 4\n")  # as if typed: a mistake, named by its key path
    page.wait_for_selector("#ft-config-check .error")
    assert "lora_rr: unknown key" in page.inner_text("#ft-config-check")
    assert page.is_disabled("#ft-launch")
    page.fill("#ft-config", config.replace("max_steps: 20", "max_steps: 3").replace("lora_r: 8", "lora_r: 4"))
    page.wait_for_selector("#ft-config-check .ok")
    page.fill("#ft-suffix", "portal")
    page.click("#ft-launch")
    page.wait_for_selector("#ft-status")
    deadline = time.time() + 600
    while page.inner_text("#ft-status") != "succeeded":
        assert page.inner_text("#ft-status") in ("queued", "running", "validating_files"), page.inner_text("#ft-job")
        assert time.time() < deadline, "the fine-tune did not finish"
        page.wait_for_timeout(1000)
    points = page.evaluate("Chart.getChart(document.querySelector('#ft-job canvas')).data.datasets[0].data"
                           ".filter(v => v !== null).length")
    assert points == 3  # one loss point per step
    page.wait_for_selector("#ft-compare .tabulator-cell:text-is('eval_loss')")
    assert "no champion yet" in page.inner_text("#ft-compare")
    t.shot("fine-tuning-1280")
    page.click("#ft-promote")
    page.wait_for_selector("#ft-promote-out .ok", timeout=120_000)
    served = page.inner_text("#ft-promote-out")
    name = re.search(r"models:/([\w.-]+)@champion", served)[1]
    # serving has it, with its lineage from the registry
    page = t.go("catalog")
    card = page.locator(f".card[data-model='{MODEL}:{name}']")
    card.wait_for()
    text = card.inner_text()
    assert "Lineage (MLflow)" in text and "champion" in text and "codes.jsonl" in text and "eval_loss" in text
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=STATE["admin_key"], max_retries=0)
    r = client.chat.completions.create(model=f"{MODEL}:{name}", messages=[{"role": "user", "content": "What is code 3?"}],
                                       max_tokens=8)
    assert r.choices[0].message.content
    page = t.go("fine-tuning")  # an earlier job's config is a starting point for the next one
    job_id = http(server, STATE["admin_key"]).get("/v1/fine_tuning/jobs").json()["data"][0]["id"]
    page.wait_for_selector(f"#ft-pick option[value='{job_id}']", state="attached")
    page.select_option("#ft-pick", job_id)
    eventually(lambda: "max_steps: 3" in page.input_value("#ft-config"))
    assert "datasets" not in page.input_value("#ft-config")
    page.wait_for_selector("#ft-config-check .ok")
    t.close()


def test_audit_log_finds_the_users_requests_and_shows_routes_as_text(browser, server):
    with http(server, STATE["user_key"]) as c:
        assert c.get("/v1/" + XSS_NAME).status_code == 404  # the audit records the route as sent
    t = admin_tab(browser, server)
    page = t.go("admin?tab=audit")
    page.fill("#audit-key", STATE["user_id"])
    page.click("#audit-search")
    page.wait_for_selector("#audit-out .tabulator-cell:text-is('/v1/chat/completions')")
    page.fill("#audit-status", "404")  # the filters narrow it to the one request that missed
    page.click("#audit-search")
    rows = page.locator("#audit-out .tabulator-row")
    eventually(lambda: rows.count() == 1 and rows.get_by_text(f"/v1/{XSS_NAME}", exact=True).count() == 1)
    page.fill("#audit-status", "")
    page.click("#audit-search")
    page.wait_for_selector("#audit-out .tabulator-cell:text-is('/v1/chat/completions')")
    with page.expect_download() as dl:
        page.locator("#audit-out .table-tools button").click()
    assert "/v1/chat/completions" in Path(dl.value.path()).read_text()
    t.shot("audit-1280")
    t.go("admin")
    page.locator(f"button[data-revoke='{STATE['user_id']}']").click()
    page.wait_for_selector(f"button[data-revoke='{STATE['user_id']}']", state="detached")
    with http(server, STATE["user_key"]) as c:
        assert c.get("/v1/models").json()["error"]["code"] == "key_revoked"
    t.close()


VIEWS = ["catalog", "playground", "spend", "operations", "fine-tuning", "collections", "admin", "admin?tab=audit"]


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)])
def test_every_page_renders_without_horizontal_scroll(browser, server, width, height):
    t = admin_tab(browser, server, width=width, height=height)
    for view in VIEWS:
        page = t.go(view)
        page.wait_for_timeout(300)
        page.wait_for_load_state("networkidle")
        assert page.locator("main .error").count() == 0, (view, page.inner_text("main")[:500])
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{view} is {overflow}px wider than a {width}px screen"
        assert page.evaluate("[...document.querySelectorAll('.tabulator-headers')].every(e => e.offsetHeight > 0)"), \
            f"{view}: a table was laid out while hidden"
        t.shot(f"page-{view.replace('?tab=', '-')}-{width}")
    if width < 500:  # the menu folds away on a phone and opens on a tap
        assert t.page.locator("#nav").is_hidden()
        t.page.click("#menu")
        assert t.page.locator("#nav a[data-view=spend]").is_visible()
    t.page.wait_for_timeout(3500)  # the operations view refreshes: no error from its timer either
    t.close()
