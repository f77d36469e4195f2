"""CPU tests of the benchmarks' own helpers (the benchmarks themselves need a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import e2e  # noqa: E402
import kernels  # noqa: E402

TINY = dict(e2e.ZEPHYR_7B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # fmt: skip


@pytest.mark.parametrize("layout", [(4, 128, True), None], ids=["u4g128_act", "fp16"])
def test_workdir_checkpoint_is_reused_only_for_its_own_layout_and_shape(tmp_path, layout):
    folder = str(tmp_path / "ckpt")
    assert not e2e.reusable_checkpoint(folder, layout, TINY)  # nothing there yet: write it
    e2e.write_random_checkpoint(folder, layout, device="cpu", config=TINY)
    assert e2e.reusable_checkpoint(folder, layout, TINY)
    for other in [(8, 128, True), (4, 128, False), None]:
        if other != layout:
            with pytest.raises(ValueError, match="holds another checkpoint"):
                e2e.reusable_checkpoint(folder, other, TINY)
    with pytest.raises(ValueError, match="config.json differs"):
        e2e.reusable_checkpoint(folder, layout, e2e.ZEPHYR_7B)


def test_result_headers_record_the_switches_but_no_paths(monkeypatch):
    monkeypatch.setenv("ZEPHYR_GEMV_GX_MAX_M", "0")
    monkeypatch.setenv("ZEPHYR_KERNEL_CACHE", "/some/cache/dir")
    monkeypatch.setenv("OTHER_SETTING", "1")
    env = kernels.zephyr_env()
    assert env["ZEPHYR_GEMV_GX_MAX_M"] == "0"
    assert "ZEPHYR_KERNEL_CACHE" not in env and "OTHER_SETTING" not in env


def test_e2e_refuses_unknown_configs_and_a_foreign_workdir_before_running(tmp_path, capsys):
    """Bad --configs or a --workdir holding another checkpoint: a clear usage error, nothing run or written."""
    with pytest.raises(SystemExit):
        e2e.main(["--configs", "u3g128", "--out", str(tmp_path / "out")])
    assert "unknown --configs ['u3g128']" in capsys.readouterr().err
    e2e.write_random_checkpoint(str(tmp_path / "u4g128_act"), (8, 128, True), device="cpu", config=TINY)
    with pytest.raises(SystemExit):
        e2e.main(["--configs", "u4g128_act", "--workdir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "holds another checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
