"""The chat page at `/` in a real headless browser (Debian's chromium through selenium and chromedriver): a
question sent, the answer streamed onto the page, a tool call shown and answered, screenshots in tmp_path."""
import json
import os
import shutil

import pytest

# The trained fixture model and the server runner are test_api_server's (imported fixtures are pytest's way).
from test_api_server import (GREETING, GREETING_ANSWER, OBSERVATION, ANSWER, QUESTION, TOOL, Server,  # noqa: F401
                             trained_model)

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        missing = "chromium / chromedriver not installed (apt-get install -y chromium chromium-driver)"
        pytest.fail(missing) if os.environ.get("CI") == "true" else pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,760",
                 "--lang=zh-CN"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=120):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def ask(driver, text):
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def last_answer(driver):
    answers = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    return answers[-1] if answers else None


@pytest.mark.slow
def test_chat_page_streams_answers_and_shows_tool_calls(browser, trained_model, tmp_path):
    with Server(trained_model, api_key="page-key", log=tmp_path / "server.log") as server:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "api-key").send_keys("page-key", Keys.TAB)  # the change event loads the model list
        wait_for(browser, lambda d: server.model in d.find_element(By.ID, "model").text)
        temperature = browser.find_element(By.ID, "temperature")
        browser.execute_script("arguments[0].value = '0'; arguments[0].dispatchEvent(new Event('input'))", temperature)

        ask(browser, GREETING)
        wait_for(browser, lambda d: last_answer(d) is not None and last_answer(d).get_attribute("data-done") == "1")
        answer = last_answer(browser)
        assert answer.find_element(By.CLASS_NAME, "body").text == GREETING_ANSWER
        assert int(answer.get_attribute("data-chunks")) > 1  # arrived in pieces, as generated
        assert "stop" in answer.find_element(By.CLASS_NAME, "meta").text
        browser.save_screenshot(str(tmp_path / "chat_page.png"))

        # A tool call appears as it is made; the result typed in goes back and the model answers from it.
        browser.find_element(By.ID, "clear").click()
        browser.find_element(By.ID, "tools").send_keys(json.dumps([TOOL], ensure_ascii=False))
        ask(browser, QUESTION)
        call = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.tool"))[0]
        assert call.find_element(By.CLASS_NAME, "body").text == 'pokedex({"name": "皮卡丘"})'
        call.find_element(By.TAG_NAME, "input").send_keys(json.dumps(OBSERVATION, ensure_ascii=False), Keys.ENTER)
        wait_for(browser, lambda d: last_answer(d).get_attribute("data-done") == "1"
                 and last_answer(d).find_element(By.CLASS_NAME, "body").text == ANSWER)
        browser.save_screenshot(str(tmp_path / "chat_page_tool.png"))
        assert (tmp_path / "chat_page.png").stat().st_size > 10_000
