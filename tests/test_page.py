"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
it loads with nothing fetched from elsewhere, streams a completion into the page, and shows the text
the API gives for the same seed. Skipped with one line where no browser is installed."""

import shutil
import threading
import time

import pytest
from flax import nnx

from conftest import make_corpus

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
uvicorn = pytest.importorskip("uvicorn")
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="no headless browser: apt-get install -y chromium chromium-driver")]


def test_the_page_streams_a_completion(tmp_path):
    import socket
    import urllib.request
    import json

    from jaxgpt.model import ModelConfig, build_model
    from jaxgpt.server import Server
    from jaxgpt.serving import SlotEngine
    from jaxgpt.tokenizer import CharTokenizer
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tok = CharTokenizer.from_text(make_corpus())
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)
    graphdef, params = nnx.split(build_model(cfg, 0), nnx.Param)
    engine = SlotEngine(graphdef, params, cfg.block_size, slots=2, chunk=4, vocab_size=tok.vocab_size)
    engine.warm_up(echo=False)
    server = Server(engine, tok, model_name="page-test", log=lambda m: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    req = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"}, data=json.dumps(
        {"prompt": "to be", "max_tokens": 40, "temperature": 0.8, "top_p": 1, "top_k": 200, "seed": 42}).encode())
    want = json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["text"]

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "page-test")
        for field, value in (("prompt", "to be"), ("max_tokens", "40"), ("temperature", "0.8"), ("seed", "42")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
        assert driver.find_element(By.ID, "status").text.startswith("done (length)")
        assert driver.execute_script("return document.getElementById('completion').textContent") == want
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(r.startswith(url) for r in resources), resources  # nothing fetched from elsewhere
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
        uv.should_exit = True
