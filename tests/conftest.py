import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _single_thread():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture()
def transformers_logging_restored():
    """The CLI and the demo quiet transformers (verbosity, progress bars) in the process that runs them:
    put it back after an in-process run, so later tests see transformers as configured."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    bars = getattr(logging, "is_progress_bar_enabled", lambda: None)()
    yield
    logging.set_verbosity(verbosity)
    if bars:
        logging.enable_progress_bar()


@pytest.fixture(scope="session")
def config_folders(tmp_path_factory):
    """Config-only model folders (no weights; read them, do not write into them): BERT classifiers with 6
    and 12 layers, and a T5 (3 encoder + 2 decoder blocks) as its config.json path."""
    from helpers import tiny_models

    root = tmp_path_factory.mktemp("model-configs")
    folders = {}
    for layers in (6, 12):
        bert = tiny_models.bert(num_layers=layers)
        bert.config.architectures = ["BertForSequenceClassification"]
        bert.config.save_pretrained(str(root / "bert{}".format(layers)))
        folders["bert{}".format(layers)] = str(root / "bert{}".format(layers))
    tiny_models.t5().config.save_pretrained(str(root / "t5"))
    folders["t5"] = str(root / "t5" / "config.json")
    return folders
