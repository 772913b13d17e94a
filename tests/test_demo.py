"""The Gradio demo in a real headless browser: open the page, submit an image, read the results.

Needs gradio, selenium and Debian's chromium + chromium-driver (installed by .ci/run); skipped without them.
"""

import os
import shutil

import pytest
import torch
from conftest import free_port

from simlap_hf import SimLAPConfig, SimLAPModel, embed
from simlap_hf.data import DataArguments, load_image_dataset, save_image_processor
from simlap_hf.retrieval import Retriever

pytest.importorskip("gradio")
pytest.importorskip("selenium")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromium-driver not installed")

DATA = ["--dataset_name", "digits", "--max_train_samples", "80", "--max_eval_samples", "20"]


@pytest.fixture
def retriever(tmp_path):
    torch.manual_seed(0)
    names = [str(i) for i in range(10)]
    config = SimLAPConfig(
        backbone="resnet10t",
        backbone_kwargs={"stem_type": "deep", "output_stride": 8},
        num_classes=10,
        out_dim=16,
        mlp_dim=32,
        image_size=16,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    model_dir, index_dir = tmp_path / "model", tmp_path / "index"
    SimLAPModel(config).eval().save_pretrained(model_dir)
    save_image_processor(model_dir, DataArguments(dataset_name="digits", input_size=16), 3)
    embed.run([*DATA, "--model_name_or_path", str(model_dir), "--output_dir", str(index_dir), "--split", "train"])
    return Retriever(model_dir, index_dir)


def test_demo_in_headless_chromium(retriever, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from simlap_hf.demo import build_demo

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    query = load_image_dataset(DataArguments(dataset_name="digits", max_train_samples=80, max_eval_samples=20))[
        "validation"
    ][0]["image"]
    image_file = tmp_path / "query.png"
    query.save(image_file)
    expected_pair = retriever.pair_search(query, target_class="7", k=3)
    expected_nearest = retriever.search(query, k=3)

    demo = build_demo(retriever, k=3)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1800",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 90)
        upload = wait.until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#query-image input[type=file]"))
        )
        upload.send_keys(str(image_file))
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#query-image img"))
        target = driver.find_element(By.CSS_SELECTOR, "#target-class input")
        target.click()
        target.send_keys("7")
        target.send_keys(Keys.ENTER)
        driver.find_element(By.CSS_SELECTOR, "#search-button").click()
        wait.until(lambda page: "closest to the image" in page.find_element(By.CSS_SELECTOR, "#pair-note").text)
        note = driver.find_element(By.CSS_SELECTOR, "#pair-note").text
        assert f"g({expected_pair['query_class']}, 7)" in note
        paired = driver.find_element(By.CSS_SELECTOR, "#paired-table").text
        nearest = driver.find_element(By.CSS_SELECTOR, "#nearest-table").text
        for hit in expected_pair["hits"]:  # the page shows the same hits as the API
            shown = str(round(hit["score"], 4))
            assert hit["source"] in paired and (shown[:-2] if shown.endswith(".0") else shown) in paired
        for hit in expected_nearest:
            assert hit["source"] in nearest
        predicted = driver.find_element(By.CSS_SELECTOR, "#predicted").text
        assert retriever.predict(query, k=1)[0]["label"] in predicted
        assert driver.find_elements(By.CSS_SELECTOR, "#paired img")  # the hits' images are shown
        assert driver.find_elements(By.CSS_SELECTOR, "#relations-heatmap img")
    finally:
        driver.quit()
        demo.close()
