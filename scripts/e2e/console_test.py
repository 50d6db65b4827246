#!/usr/bin/env python3
"""The web console in headless Chromium (through chromedriver): sign in to a node of
the demo cluster, see the nodes and the volume, kill the volume's primary, and see the
new primary on the page within 3 s without reloading. Saves a screenshot.

    console_test.py CONSOLE_URL TOKEN PRIMARY_PID PRIMARY_NAME SCREENSHOT MARKUP_IQN

MARKUP_IQN names a target with HTML in it: the page must show it as text.
"""

import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from webdriver import Chrome  # noqa: E402

url, token, primary_pid, primary, shot, markup = sys.argv[1:7]
primary_pid = int(primary_pid)


def volume_primary(b):
    return b.text('tr[data-volume="demo"] td.primary').strip()


with Chrome(log_path=os.path.join(os.path.dirname(shot), "chromedriver.log")) as b:
    b.get(url)
    # Before sign-in: the sign-in form, and nothing of the cluster.
    b.wait_for(lambda: b.find("#token") is not None, 10, message="no sign-in form")
    text = b.page_text()
    assert "iqn." not in text and b.find("#volumes") is None, "cluster data visible before sign-in"
    b.type("#token", "bwk1:wrong")
    b.click("#signin")
    b.wait_for(lambda: b.find("#token") is not None, 10, message="wrong token accepted")
    assert b.find("#nodes") is None, "a wrong token reached the console"
    b.type("#token", token, clear=True)
    b.click("#signin")
    b.wait_for(lambda: b.find('tr[data-volume="demo"]') is not None, 15,
               message="the console shows no volume 'demo' after sign-in")
    for n in ("n1", "n2", "n3"):
        b.wait_for(lambda: b.find(f'tr[data-node="{n}"]') is not None, 5,
                   message=f"node {n} missing")
    b.wait_for(lambda: markup in b.text("#events"), 5,
               message="the event with markup from a stranger is not shown as text")
    assert not b.find_all("#events b") and not b.find_all("#events img"), \
        "markup from the network became elements"
    assert b.execute("return window.__xss === undefined;"), "markup from the network ran a script"
    print("console: a stranger's text with HTML in the event log shows as text")
    before = volume_primary(b)
    assert before == primary, f"page says primary {before!r}, the demo said {primary!r}"
    print(f"console: signed in; nodes n1 n2 n3, volume demo with primary {before}")
    b.execute("window.__sameDocument = true;")
    os.kill(primary_pid, 9)
    killed = time.monotonic()
    b.wait_for(lambda: volume_primary(b) not in ("", primary), 3,
               message=f"the page still shows primary {primary} 3 s after the kill")
    took = time.monotonic() - killed
    after = volume_primary(b)
    assert b.execute("return window.__sameDocument === true;"), "the page was reloaded"
    b.screenshot(shot)
    print(f"console: new primary {after} on the page {took:.2f} s after kill -9 of {primary} "
          f"(no reload); screenshot {shot}")
