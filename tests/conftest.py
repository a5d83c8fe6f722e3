import os
import pathlib

import pytest
import torch

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
# subprocesses (CLI tests, torchrun) must import this tree's code
os.environ["PYTHONPATH"] = str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
