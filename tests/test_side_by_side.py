import threading

import pytest
import torch

from tether.trainers.common import side_by_side


def test_both_run_at_once_each_on_one_thread_and_the_count_comes_back():
    threads, met, seen = torch.get_num_threads(), threading.Barrier(2, timeout=10), {}

    def work(name):
        met.wait()  # returns only when the other call is running too
        seen[name] = (threading.current_thread(), torch.get_num_threads())
        return torch.ones(64, 64) @ torch.ones(64, 64)

    here, there = side_by_side(lambda: work("here"), lambda: work("there"))
    assert float(here[0, 0]) == float(there[0, 0]) == 64.0
    assert seen["here"] == (threading.main_thread(), 1)
    assert seen["there"][0] is not threading.main_thread() and seen["there"][1] == 1
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("failing", ["here", "there"])
def test_an_error_on_either_side_is_raised_after_both_have_finished(failing):
    threads, finished = torch.get_num_threads(), []

    def call(name):
        def run():
            if name == failing:
                raise ValueError(f"{name} failed")
            finished.append(name)
            return name

        return run

    with pytest.raises(ValueError, match=f"{failing} failed"):
        side_by_side(call("here"), call("there"))
    assert finished == [{"here": "there", "there": "here"}[failing]]
    assert torch.get_num_threads() == threads
