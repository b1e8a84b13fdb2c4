"""The status page at / in a real headless Chromium (Debian's chromium + chromedriver, driven by
Selenium), against a running node fed by storescu: counts, thumbnails that decode, the failed
reason, and the retry button with and without the admin token."""
from __future__ import annotations

import io
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file

from support.node_peers import NodeProcess, free_port, storescp, storescu

TOKEN = "correct horse battery staple"


@pytest.fixture
def browser(tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no chromium/chromedriver: scripts/setup --with-peers installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1800", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def rows(driver, table: str) -> dict[str, object]:
    from selenium.webdriver.common.by import By

    return {r.get_attribute("data-job"): r for r in driver.find_elements(By.CSS_SELECTOR, f"#{table} tr[data-job]")}


def count(driver, state: str) -> int:
    from selenium.webdriver.common.by import By

    return int(driver.find_element(By.CSS_SELECTOR, f'#queue tr[data-state="{state}"] .count').text)


def press_retry(driver, job_id: str, token: str | None, answer_id: str) -> str:
    """Fill the job's token field (or not), press its retry button, and return the text of the
    element `answer_id` on the page that comes back."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    form = rows(driver, "failed")[job_id].find_element(By.TAG_NAME, "form")
    if token is not None:
        form.find_element(By.NAME, "token").send_keys(token)
    form.find_element(By.TAG_NAME, "button").click()
    answer = WebDriverWait(driver, 15).until(expected_conditions.presence_of_element_located((By.ID, answer_id)))
    return answer.text


@pytest.mark.timeout(180)
def test_status_page_in_chromium_shows_counts_thumbnails_failures_and_retries_with_the_token(
        tmp_path, peers, constant_weights, browser):
    from selenium.webdriver.common.by import By

    http_port, pacs_port = free_port(), free_port()
    outbox = tmp_path / "outbox"
    node = NodeProcess(tmp_path / "node", constant_weights, [
        {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
        {"name": "archive", "type": "folder", "path": str(outbox)}],
        retry=(0.2, 0.5), http_port=http_port, admin_token=TOKEN)
    # the PACS is down past give_up_hours (1.8 s): every job ends in failed/
    node.config.write_text(node.config.read_text().replace("give_up_hours = 1", "give_up_hours = 0.0005"))
    peers.append(node)
    node.start()
    cr, ct = Path(get_testdata_file("RG1_UNCR.dcm")), Path(get_testdata_file("CT_small.dcm"))
    assert storescu([cr, ct], node.port).returncode == 0
    report = node.wait_drained(expected_done=2, timeout=90)
    assert report["counts"]["failed"] == 2
    job_of = {f["sop_instance_uid"]: str(f["job_id"]) for f in report["failed"]}
    cr_job, ct_job = job_of[str(_uid(cr))], job_of[str(_uid(ct))]

    page = f"http://127.0.0.1:{http_port}/"
    browser.get(page)
    assert "dicom-node ENHANCE" in browser.title
    assert (count(browser, "failed"), count(browser, "done"), count(browser, "received")) == (2, 0, 0)
    recent = rows(browser, "recent")
    assert set(recent) == {cr_job, ct_job}
    assert "Computed Radiography" in recent[cr_job].text and "MODALITY" in recent[cr_job].text

    # the CR's before/after thumbnails decode in the browser and as PNGs
    for side in ("before", "after"):
        img = recent[cr_job].find_element(By.CSS_SELECTOR, f"img.{side}")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
        with urllib.request.urlopen(img.get_attribute("src"), timeout=10) as response:
            picture = np.asarray(Image.open(io.BytesIO(response.read())))
        assert picture.dtype == np.uint8 and max(picture.shape) <= 256 and picture.std() > 5
    assert recent[ct_job].find_elements(By.TAG_NAME, "img") == []  # not enhanced, no pictures

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        metrics = {(s.name, tuple(s.labels.values())): s.value
                   for f in text_string_to_metric_families(response.read().decode()) for s in f.samples}
    assert metrics[("dicom_node_failed_total", ("1.2.840.10008.5.1.4.1.1.1",))] == 1  # the CR
    assert metrics[("dicom_node_failed_total", ("1.2.840.10008.5.1.4.1.1.2",))] == 1  # the CT

    failed = rows(browser, "failed")
    reason = failed[cr_job].find_element(By.CLASS_NAME, "reason").text
    assert reason.startswith("gave up after") and "pacs" in reason and "could not connect" in reason
    assert "archive (derived)" in failed[cr_job].text and "archive (original)" in failed[ct_job].text
    browser.save_screenshot(str(tmp_path / "status-failed.png"))

    # retry without a token, then with a wrong one: 401, nothing queued
    assert "401 Unauthorized: the admin token is wrong" in press_retry(browser, cr_job, None, "error")
    browser.get(page)
    assert "401 Unauthorized" in press_retry(browser, cr_job, "guess", "error")
    assert _post_status(http_port, {"job": cr_job, "token": "guess"}) == 401
    assert node.status()["counts"]["failed"] == 2

    # the PACS comes back; the right token queues the CR again and it is delivered
    received = tmp_path / "pacs"
    with storescp(received, "PACS", pacs_port):
        browser.get(page)
        assert press_retry(browser, cr_job, TOKEN, "notice") == f"job {cr_job} queued again"
        report = node.wait_drained(expected_done=2, timeout=60)
        assert report["counts"]["done"] == 1 and [str(f["job_id"]) for f in report["failed"]] == [ct_job]
        assert len(list(received.iterdir())) == 2  # the CR's derived instance and its original
        assert len(list(outbox.rglob("*.dcm"))) == 3  # CR derived + original, CT original: none twice
        browser.get(page)
        assert (count(browser, "failed"), count(browser, "done")) == (1, 1)
        assert set(rows(browser, "failed")) == {ct_job}
        assert rows(browser, "recent")[cr_job].get_attribute("data-state") == "done"
        shot = tmp_path / "status-retried.png"
        browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0


def _uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _post_status(port: int, form: dict) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/retry",
                                     data=urllib.parse.urlencode(form).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
