"""The leaderboard site in a real browser: Debian's headless chromium driven by playwright, from file://.

``make test`` installs chromium (``make browser-deps``); without it these tests skip and say why.
Playwright never downloads a browser here: it launches ``/usr/bin/chromium``.
"""

from __future__ import annotations

import shutil

import pytest

from test_site import first, rec, write_results  # tests/ is on sys.path (rootdir-less test modules)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# a real browser per test: part of `make test`, not of the fast `make check` tier
pytestmark = [
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed (make browser-deps installs it)"),
    pytest.mark.integration,
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from bench.aggregate import aggregate

    root = tmp_path_factory.mktemp("site")
    mp = pytest.MonkeyPatch()
    mp.setenv("BENCH_CACHE", str(root / "cache"))
    items = [rec("none", 0.0, "none00", first(92), tokens=576)]
    for i, m in enumerate(["random", "fastv", "pool", "divprune"]):
        for j, ratio in enumerate((0.5, 0.75, 0.9)):
            items.append(rec(m, ratio, f"{m[:4]}{j}", first(90 - 6 * j - 2 * i), tflops=0.002 - 0.0005 * j + i * 1e-5))
    res = write_results(root / "results", items)
    aggregate(res, quiet=True, kept=["random", "fastv"])
    mp.undo()
    return res / "site"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems = []
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, problems


def run_ids(page):
    return page.eval_on_selector_all("#leaderboard tbody tr:not([hidden]) td:last-child", "cells => cells.map(c => c.textContent.trim())")


def test_index_loads_without_console_errors_and_draws_plots(site, browser):
    page, problems = open_page(browser, site / "index.html")
    page.wait_for_selector(".js-plotly-plot .scatterlayer")
    assert problems == []
    assert page.locator(".js-plotly-plot").count() == 3  # Pareto vs TFLOPs, prefill ms, KV MB
    assert page.locator("#leaderboard tbody tr").count() == 13
    assert page.locator(".row-count").first.inner_text() == "13 of 13 rows"
    # hovering a point shows its method, budget, run id and measured tokens
    texts = page.evaluate("() => document.querySelector('.js-plotly-plot').data.flatMap(t => t.hovertext || [])")
    assert any("run rand0" in t and "measured tokens 288" in t and "random" in t for t in texts)
    page.close()


def test_sorting_changes_the_row_order(site, browser):
    page, problems = open_page(browser, site / "index.html")
    before = run_ids(page)
    assert before[0] == "none00"  # ranked by score
    page.click("#leaderboard th:has-text('TFLOPs')")
    asc = run_ids(page)
    assert asc != before and asc[0] == "rand2" and asc[-1] == "none00"  # cheapest first
    page.click("#leaderboard th:has-text('TFLOPs')")
    assert run_ids(page) == asc[::-1]
    assert problems == []
    page.close()


def test_filters_change_the_row_count(site, browser):
    page, problems = open_page(browser, site / "index.html")
    page.select_option("#filter-method", "random")
    assert run_ids(page) == ["rand0", "rand1", "rand2"]
    assert page.locator(".row-count").first.inner_text() == "3 of 13 rows"
    page.select_option("#filter-budget", "0.9")
    assert run_ids(page) == ["rand2"]
    page.select_option("#filter-method", "")
    assert len(run_ids(page)) == 4 and page.locator(".row-count").first.inner_text() == "4 of 13 rows"
    assert problems == []
    page.close()


def test_method_pages_show_kept_token_pictures(site, browser):
    page, problems = open_page(browser, site / "methods" / "random.html")
    imgs = page.locator(".kept-picture img")
    assert imgs.count() == 9  # 3 images x 3 ratios
    loaded = page.eval_on_selector_all(".kept-picture img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
    assert all(w == 2 * 168 + 6 for w in loaded), loaded  # image | kept patches
    assert "kept before the LLM: 144 of 576" in page.inner_text("#kept")
    assert page.locator("#about a[href^='https://arxiv.org']").count() == 0  # random has no paper
    assert problems == []
    page.close()
    page, problems = open_page(browser, site / "methods" / "fastv.html")
    assert page.get_attribute("#about a[href*='arxiv.org']", "href") == "https://arxiv.org/abs/2403.06764"
    assert "from LLM layer" in page.inner_text("#kept")  # in-LLM: one panel per stage
    assert page.eval_on_selector_all(".kept-picture img", "imgs => imgs.every(i => i.complete && i.naturalWidth > 168)")
    assert problems == []
    page.close()
