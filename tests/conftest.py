from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network in tests

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.make_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Mini-Omni2 checkpoint (vision adapter + random CLIP ViT-B-32.pt)."""
    from model.make_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt2") / "tiny2", "tiny", seed=0, family="mini-omni2")


@pytest.fixture(scope="session")
def tiny2_model(tiny2_ckpt: Path):
    from model.omni import OmniModel

    return OmniModel.load(tiny2_ckpt)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt: Path):
    from model.omni import OmniModel

    return OmniModel.load(tiny_ckpt)


@pytest.fixture(scope="session")
def question_audio():
    from model.audio import load_audio_file

    return load_audio_file(FIXTURES / "question.wav")


@pytest.fixture(scope="session")
def vad():
    from streaming.vad import SileroVAD

    return SileroVAD()


@pytest.fixture(scope="session")
def recognizer():
    from streaming.detector import FasterWhisperASR, RecognizerWorker

    worker = RecognizerWorker(FasterWhisperASR())
    yield worker
    worker.close()


@pytest.fixture()
def runner(tiny_model):
    from streaming.runner import ModelRunner

    r = ModelRunner(tiny_model).start()
    yield r
    r.close()


def fixture_audio(name: str):
    from model.audio import load_audio_file

    return load_audio_file(FIXTURES / f"{name}.wav")
