"""An axe-core accessibility audit of a Playwright page, injected through the DevTools protocol.

The page's Content-Security-Policy allows scripts from its own origin only, so axe cannot arrive as a
<script> tag (``page.add_script_tag`` is refused); ``Runtime.evaluate`` on a CDP session runs it the way
a person's devtools console would, and leaves the CSP as the page serves it.

axe-core is vendored (tests/support/axe-core/, one pinned file with its MPL-2.0 licence, NOTICE says
so): the browser tests need no network and no Node. To update: ``npm pack axe-core@VERSION``, copy
package/axe.min.js, LICENSE and LICENSE-3RD-PARTY.txt here and change AXE_VERSION.
"""

from __future__ import annotations

import json
from pathlib import Path

AXE_VERSION = "4.14.1"
AXE_SCRIPT = Path(__file__).resolve().parent / "axe-core" / "axe.min.js"
# WCAG 2.1 A and AA (the 2.0 rules included), and axe's own best practices
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]


def axe_source() -> str:
    source = AXE_SCRIPT.read_text(encoding="utf-8")
    assert source.startswith(f"/*! axe v{AXE_VERSION}\n"), "tests/support/axe-core/axe.min.js is not the pinned axe"
    return source


def inject_axe(page) -> None:
    """Define window.axe in the page's main world, past the CSP, as the DevTools console would."""
    session = page.context.new_cdp_session(page)
    try:
        answer = session.send("Runtime.evaluate", {"expression": axe_source(), "returnByValue": True})
    finally:
        session.detach()
    assert "exceptionDetails" not in answer, answer["exceptionDetails"]
    assert page.evaluate("typeof window.axe?.run") == "function"


def axe_violations(page) -> list[dict]:
    """Run axe on the whole document with AXE_TAGS; its violations (empty when the page passes)."""
    if page.evaluate("typeof window.axe") == "undefined":
        inject_axe(page)
    # colours in mid-transition (a button fading back from disabled) are neither state: let them settle
    page.evaluate("Promise.all(document.getAnimations().filter(a => a instanceof CSSTransition).map(a => a.finished))")
    result = page.evaluate(
        "tags => axe.run(document, {runOnly: {type: 'tag', values: tags}, resultTypes: ['violations']})",
        AXE_TAGS,
    )
    assert result["testEngine"]["version"] == AXE_VERSION
    return result["violations"]


def describe(violations: list[dict]) -> str:
    """One line per violation and per offending element: rule id, what it asks, the element and why."""
    lines = []
    for v in violations:
        lines.append(f"{v['id']} ({v['impact']}): {v['help']} <{v['helpUrl']}>")
        for node in v["nodes"]:
            lines.append(f"    {json.dumps(node['target'])}: {node['failureSummary'].replace(chr(10), ' ')}")
    return "\n".join(lines)
