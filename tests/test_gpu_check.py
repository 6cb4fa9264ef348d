"""benchmarks/gpu_check.py's promises that hold without a GPU: whatever fails, its last line is
the JSON object, with the failure named; CI runs its --smoke mode end to end."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_the_full_check_says_so_in_its_json_line(capsys):
    assert gpu_check.main(["--budget-s", "60"]) == 1
    result = last_json(capsys.readouterr().out)
    assert set(gpu_check.RESULT_KEYS) <= result.keys()
    assert result["device"] == "CPU" and result["images_per_second"] is None
    assert "no CUDA device" in result["errors"]["environment"]


def test_a_failing_stage_is_recorded_and_the_next_ones_still_run(monkeypatch, capsys, tmp_path):
    def no_disk(*args):
        raise OSError("No space left on device")

    ran = []
    monkeypatch.setattr(gpu_check, "run_cuda_tests",
                        lambda *args: {"tests_passed": 3, "tests_failed": 1})
    monkeypatch.setattr(gpu_check, "build_data",
                        lambda *args: {"data_path": str(tmp_path), "train_images": 40})
    monkeypatch.setattr(gpu_check, "run_loop", lambda name, *args: ran.append(name) or no_disk())
    monkeypatch.setattr(gpu_check, "run_compute", lambda *args: {"compute_images_per_second": 12.5})
    assert gpu_check.main(["--smoke", "--work-dir", str(tmp_path / "work")]) == 1
    result = last_json(capsys.readouterr().out)
    assert ran == ["loop", "compile_loop"]
    assert result["errors"] == {"loop": "OSError: No space left on device",
                                "compile_loop": "OSError: No space left on device"}
    assert (result["tests_passed"], result["tests_failed"]) == (3, 1)
    assert result["compute_images_per_second"] == 12.5
    assert result["images_per_second"] is None and result["compile_images_per_second"] is None


def test_without_a_c_compiler_the_compile_stage_is_skipped_and_says_why(monkeypatch):
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    assert "C compiler" in gpu_check.compile_unavailable(True)
    assert gpu_check.compile_unavailable("eager") is None  # no Triton, no compiler needed
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert gpu_check.compile_unavailable(True) is None


def test_num_workers_in_the_json_is_the_resolved_count():
    assert isinstance(gpu_check.resolved_workers("auto"), int)
    assert gpu_check.resolved_workers(3) == 3
