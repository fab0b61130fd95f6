"""
Shared by every test file: the in-process tests run on one torch thread, and the warm-started tiny model is built
once a session.
"""
import shutil

import pytest
import torch

import tiny


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # at the tiny model's sizes a second thread saves little on an idle CPU, and while another process holds a core
    # the two wait on each other at every op: test_rollout_compile.py's static-cache and decode-step tests took
    # 20.6 CPU s on two threads, 10.0 on one (load ~5 on 2 cores). Subprocess runs set their own (runtime.py)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def warm_tiny_model(tmp_path_factory):
    """copy_to(dest): a copy of tiny.save_tiny_model's warm-started Qwen2-VL at dest (its path returned). The model
    is built once a session (its warm start: ~6 CPU s), each user gets its own folder."""
    built = tiny.save_tiny_model(str(tmp_path_factory.mktemp("warm-tiny") / "model"))

    def copy_to(dest):
        return shutil.copytree(built, str(dest))
    return copy_to
