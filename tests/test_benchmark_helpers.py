"""CPU tests of the benchmarks' own helpers (the benchmarks themselves need a GPU)."""

from __future__ import annotations

import os
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
    """Bad --configs, bad --batches or a --workdir holding another checkpoint: a clear usage error, nothing
    run or written (e2e.checked_run_args, shared with decode_timeline.py)."""
    with pytest.raises(SystemExit):
        e2e.main(["--configs", "u3g128", "--out", str(tmp_path / "out")])
    assert "unknown --configs ['u3g128']" in capsys.readouterr().err
    for bad, why in (("1,x", "--batches must be integers"), ("0,8", "--batches must be >= 1")):
        with pytest.raises(SystemExit):
            e2e.main(["--batches", bad, "--out", str(tmp_path / "out")])
        assert why in capsys.readouterr().err
    e2e.write_random_checkpoint(str(tmp_path / "u4g128_act"), (8, 128, True), device="cpu", config=TINY)
    with pytest.raises(SystemExit):
        e2e.main(["--configs", "u4g128_act", "--workdir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "holds another checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _timeline_rows(layers: int = 32, steps: int = 2):
    """Synthetic timeline records (kernels/timeline.cuh's layout, ns) of `steps` decode steps: per
    layer a qkv GEMV, a split attention whose last block merges, and a norm, with fixed timings."""
    rows, t = [], 1_000_000
    for _ in range(steps):
        for _ in range(layers):
            # (tag, n, blocks, duration ns, lock stamps)
            for tag, n, blocks, dur, lock in ((2 + 10 + 1000, 6144, 4, 5000, False),
                                              (1 + 120 + 1000 + 100000, 256, 3, 10000, True),
                                              (3, 4096, 1, 2000, False)):  # fmt: skip
                for b in range(blocks):
                    last = lock and b == blocks - 1
                    stamps = [t - 3000, t + 250 * (b % 2), t + 1000, t + 4000, t + 4500 if lock else 0]
                    end = t + (dur if last or not lock else 4750)
                    rows.append(stamps + [end, tag | (b << 32), 7 | (n << 32)])
                t += dur + 1000  # 1 us between kernels
        t += 50_000  # host side between steps
    return rows


def test_decode_timeline_groups_launches_and_steps():
    import decode_timeline as dt

    recs = dt.parse(_timeline_rows())
    assert recs[0].smid == 7 and recs[0].n == 6144 and recs[0].t[0] == 997.0  # us
    launches = dt.instances(recs)
    assert len(launches) == 2 * 32 * 3
    found = dt.steps(launches)
    assert len(found) == 2 and all(len(s) == 96 for s in found)
    s = dt.summarize(found[-1])
    gemv, attn, norm = (s["kinds"][dt.kernel_name(*k)] for k in ((1012, 6144), (101121, 256), (3, 4096)))
    assert gemv["calls"] == attn["calls"] == norm["calls"] == 32 and attn["blocks"] == 3
    assert gemv["dur"] == 5.0 and attn["dur"] == 10.0 and norm["dur"] == 2.0
    assert attn["gap"] == 1.0 and norm["gap"] == 1.0 and gemv["gap"] == 1.0  # (the first launch has none)
    assert gemv["wspr"] == 0.25 and gemv["lead"] == 3.0
    assert attn["ph1"] == 1.0 and attn["ph2"] == 3.0 and attn["ph3"] == 0.5
    assert attn["merge"] == 5.5 and attn["arrspr"] == 0.0
    assert gemv["sms"] == attn["sms"] == 1 and gemv["p2spr"] == 0.0  # every synthetic block on SM 7
    assert s["span_us"] == 32 * 20.0 - 1.0 and abs(s["between_us"] - (32 * 3 - 1) * 1.0) < 1e-9
    assert "attention S=12 B=1 early threads=256" in dt.kernel_name(101121, 256)
    assert dt.kernel_name(1012, 6144) == "gemv N=6144 M=1 S=1"


def test_decode_timeline_counts_sms_and_writes_records(tmp_path):
    """``sms`` counts the SMs a launch's blocks ran on, ``p2spr`` spreads stamp 2 over its blocks, and
    --records' writer round-trips a step's rows (plain and gzip JSON)."""
    import gzip
    import json

    import decode_timeline as dt

    rows = _timeline_rows(steps=1)
    for i, r in enumerate(rows):  # spread the blocks over SMs 0..2, the third one's loop ending 0.5 us later
        r[7] = (i % 3) | (r[7] & ~0xFFFFFFFF)
        if i % 3 == 2:
            r[2] += 500
    step = dt.steps(dt.instances(dt.parse(rows)))[0]
    gemv = dt.summarize(step)["kinds"]["gemv N=6144 M=1 S=1"]
    assert gemv["sms"] == 3 and gemv["p2spr"] == 0.5
    for name in ("rec.json", "rec.json.gz"):
        path = tmp_path / name
        dt.write_records(str(path), {"x": dt.step_rows(step)})
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt") as f:
            back = json.load(f)["x"]
        assert len(back) == len(step) and back[0][0][8] == step[0]["records"][0].smid
        assert back[0][0][:6] == step[0]["records"][0].t
        assert not (tmp_path / f"{name}.tmp").exists()


def test_decode_timeline_drops_short_segments():
    import decode_timeline as dt

    rows = _timeline_rows(layers=4, steps=1)  # 12 launches: too few for a decode step
    assert dt.steps(dt.instances(dt.parse(rows))) == []
    assert dt.steps([]) == []


def test_decode_timeline_refuses_bad_arguments_before_running(tmp_path, capsys, monkeypatch):
    """Unknown --configs, bad --batches or a --workdir holding another checkpoint: a usage error before
    any GPU work, and the timeline build switch is not set."""
    import decode_timeline as dt

    monkeypatch.delenv("ZEPHYR_KERNEL_TIMELINE", raising=False)
    with pytest.raises(SystemExit):
        dt.main(["--configs", "u3g128"])
    assert "unknown --configs ['u3g128']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dt.main(["--batches", "1,x"])
    assert "--batches must be integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dt.main(["--batches", "0"])
    assert "--batches must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dt.main(["--records", str(tmp_path / "missing" / "rec.json.gz")])
    assert "--records: no folder" in capsys.readouterr().err
    e2e.write_random_checkpoint(str(tmp_path / "u4g128_act"), (8, 128, True), device="cpu", config=TINY)
    with pytest.raises(SystemExit):
        dt.main(["--configs", "u4g128_act", "--workdir", str(tmp_path)])
    assert "holds another checkpoint" in capsys.readouterr().err
    assert "ZEPHYR_KERNEL_TIMELINE" not in os.environ


def test_decode_whatif_refuses_a_foreign_workdir_before_running(tmp_path, monkeypatch):
    """AB_WORK holding another checkpoint: a clear error before anything is loaded or patched."""
    import decode_whatif

    e2e.write_random_checkpoint(str(tmp_path / "u8g128_act"), (4, 128, True), device="cpu", config=TINY)
    monkeypatch.setenv("AB_WORK", str(tmp_path))
    real = decode_whatif.zm.decode_attention
    with pytest.raises(SystemExit, match="holds another checkpoint"):
        decode_whatif.main()
    assert decode_whatif.zm.decode_attention is real  # the model's attention was not swapped


def test_ab_decode_refuses_bad_arguments_before_running(capsys, monkeypatch):
    """ab_decode.py: unknown --configs, bad --batches / --steps / --repeat and a --label that would split
    its RESULT line are usage errors before any GPU work; without a GPU it says so and returns 1."""
    import ab_decode

    for argv, msg in ((["--configs", "u5g128"], "unknown --configs"), (["--batches", "2,a"], "--batches must be"),
                      (["--steps", "1"], "--steps must be >= 2"), (["--repeat", "0"], "--steps must be >= 2"),
                      (["--label", "two words"], "--label must be one word")):  # fmt: skip
        with pytest.raises(SystemExit):
            ab_decode.main(argv)
        assert msg in capsys.readouterr().err, argv
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ab_decode.main(["--batches", "1"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    # --build-only says whether the tree's kernels could be built, and fails when they could not
    from zephyr_plugins import kernel_build

    monkeypatch.setattr(kernel_build, "ensure_built", lambda: (False, "no nvcc here"))
    assert ab_decode.main(["--build-only", "--label", "x"]) == 1
    assert "BUILT x failed: no nvcc here" in capsys.readouterr().out
    monkeypatch.setattr(kernel_build, "ensure_built", lambda: (True, None))
    assert ab_decode.main(["--build-only", "--label", "x"]) == 0
    assert "BUILT x ok" in capsys.readouterr().out


def _tree_copy(dest: Path) -> Path:
    """The parts of this repository that ab_decode.py imports from a tree, copied to ``dest``."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    for folder in ("zephyr_plugins", "kernels"):
        shutil.copytree(root / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "benchmarks").mkdir()
    for name in ("ab_decode.py", "e2e.py", "kernels.py"):
        shutil.copy(root / "benchmarks" / name, dest / "benchmarks" / name)
    return dest


def test_ab_decode_runs_the_tree_it_is_given_not_the_one_on_pythonpath(tmp_path):
    """ab_decode.py --tree: the runtime and kernels of that tree run, whichever tree PYTHONPATH names and
    whichever tree's copy of the script is started (before --tree, e2e.py put its own tree first and
    session 25's first A/B runs measured main against itself). Its TREE line names the tree, its kernel
    folder and their cache key; a changed kernel source changes the key."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    copy = _tree_copy(tmp_path / "copy")
    env = {**os.environ, "PYTHONPATH": str(root), "ZEPHYR_PLUGINS_NO_ENTRYPOINTS": "1"}

    def tree_line(tree):
        out = subprocess.run([sys.executable, str(root / "benchmarks" / "ab_decode.py"), "--tree", str(tree),
                              "--label", "x", "--print-tree"], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        line = [x for x in out.stdout.splitlines() if x.startswith("TREE ")]
        assert len(line) == 1, out.stdout
        _, label, t, _, kdir, _, key, _, runtime = line[0].split()
        return label, Path(t), Path(kdir), key, runtime

    label, t, kdir, key, runtime = tree_line(copy)
    assert (label, t, kdir) == ("x", copy.resolve(), copy.resolve() / "kernels")
    assert tree_line(root)[1:] == (root, root / "kernels", key, runtime)  # same sources, same key and digest
    with open(copy / "zephyr_plugins" / "runtime.py", "a") as f:
        f.write("# changed\n")
    after_py = tree_line(copy)
    assert after_py[3] == key and after_py[4] != runtime  # a Python change: same kernels, another runtime
    with open(copy / "kernels" / "gptq_gemm.cu", "a") as f:
        f.write("// changed\n")
    assert tree_line(copy)[3] != key


def test_ab_decode_refuses_a_tree_it_cannot_run(tmp_path, capsys):
    """A --tree that is no tree of this repository, or one whose modules this process imported from
    another tree already, is refused with both paths named, before anything runs."""
    import ab_decode

    assert ab_decode.main(["--tree", str(tmp_path), "--print-tree"]) == 2
    assert "not a zephyr-plugins tree" in capsys.readouterr().err
    copy = _tree_copy(tmp_path / "copy")
    saved = list(sys.path)
    try:
        with pytest.raises(ValueError, match="outside that tree"):
            ab_decode.runtime_tree(copy)  # e2e and zephyr_plugins are this repository's, imported above
    finally:
        sys.path[:] = saved


def test_result_files_name_the_commit_from_the_environment(monkeypatch):
    """Every benchmark files its results under ZEPHYR_GIT_COMMIT when set (a tree copied to the GPU machine
    may carry a stale .git), vllm_cpu.py through kernels.py's rule; else git's HEAD (or "unknown").
    vllm_cpu.py is imported in a child process: importing it sets vLLM's environment defaults."""
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "benchmarks"

    def vllm_cpu_commit() -> str:
        code = "import vllm_cpu; print(vllm_cpu.git_commit())"
        return subprocess.run([sys.executable, "-c", code], cwd=bench, env=dict(os.environ), capture_output=True,
                              text=True, check=True, timeout=120).stdout.strip()  # fmt: skip

    monkeypatch.setenv("ZEPHYR_GIT_COMMIT", "0123abc")
    assert kernels.git_commit() == vllm_cpu_commit() == "0123abc"
    monkeypatch.delenv("ZEPHYR_GIT_COMMIT")
    head = vllm_cpu_commit()
    assert head == kernels.git_commit() and head != "0123abc" and head


FAKE_WORKER = '''
import argparse, os, sys
from pathlib import Path
ap = argparse.ArgumentParser()
ap.add_argument("--tree"); ap.add_argument("--label"); ap.add_argument("--configs"); ap.add_argument("--batches")
ap.add_argument("--steps"); ap.add_argument("--repeat"); ap.add_argument("--workdir")
ap.add_argument("--print-tree", action="store_true"); ap.add_argument("--build-only", action="store_true")
a = ap.parse_args()
tree = Path(a.tree)
print(f"TREE {a.label} {tree} kernels {tree / 'kernels'} key k runtime {(tree / 'RUNTIME').read_text().strip()}")
if a.print_tree:
    sys.exit(0)
if a.build_only:
    print(f"BUILT {a.label} ok"); sys.exit(0)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(a.label + "\\n")
n = sum(1 for _ in open(os.environ["FAKE_LOG"]))
if os.environ.get("FAKE_FAIL") == str(n):
    print("boom", file=sys.stderr); sys.exit(3)
print("CARD", a.label, "Fake GPU 80GB")
rate = float(os.environ.get("FAKE_RATE", "100")) + n  # a drift with the run number
for cfg in a.configs.split(","):
    for b in a.batches.split(","):
        print(f"RESULT {a.label} {cfg} b{b} {rate * int(b):9.1f} tok/s {1e6 / rate:8.1f} us/step tokens "
              f"{os.environ.get('FAKE_TOKENS', 'same')}")
'''


def _fake_trees(tmp_path, runtimes):
    trees = []
    for i, r in enumerate(runtimes):
        t = tmp_path / f"tree{i}"
        t.mkdir()
        (t / "RUNTIME").write_text(r)
        trees.append(t)
    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_WORKER)
    return trees, worker


def test_ab_trees_refuses_variants_that_run_the_same_code(tmp_path, capsys, monkeypatch):
    """Two variants with one runtime digest and one environment would measure a build against itself
    (session 25: a patch that `git apply` skipped): refused before any build or run, unless --same-ok;
    the same tree with another environment is a real variant. Bad variant specs are usage errors."""
    import ab_trees

    (a, b), worker = _fake_trees(tmp_path, ["r1", "r1"])
    log = tmp_path / "log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    w = ["--worker", str(worker), "--rounds", "1", "--batches", "1"]
    assert ab_trees.main([f"x={a}", f"y={b}", *w]) == 2
    assert "y and x run the same code with the same environment" in capsys.readouterr().err
    assert not log.exists()  # nothing ran
    assert ab_trees.main([f"x={a}", f"y={a}@ZEPHYR_SMEM_CARVEOUT=100", *w]) == 0
    assert ab_trees.main([f"x={a}", f"y={b}", "--same-ok", *w]) == 0
    for spec, msg in ((f"two words={a}", "one-word label"), (f"x={tmp_path / 'nope'}", "is not a folder"),
                      (f"x={a}@1BAD=2", "is not VAR=VALUE")):  # fmt: skip
        with pytest.raises(SystemExit):
            ab_trees.main([spec, f"y={b}", *w])
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ab_trees.main([f"x={a}", f"x={b}", *w])
    assert "distinct labels" in capsys.readouterr().err


def test_ab_trees_rotates_the_order_and_summarizes(tmp_path, capsys, monkeypatch):
    """Every variant once per round, the order rotated by one each round; the summary has each variant's
    runs, min / median / max and median over the first's; a failed run is reported, the rest go on, and
    the exit status says so; the JSON (atomic) has the card, the variants and every RESULT line."""
    import json

    import ab_trees

    (a, b, c), worker = _fake_trees(tmp_path, ["r1", "r2", "r3"])
    log = tmp_path / "log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    out = tmp_path / "ab.json"
    argv = [f"x={a}", f"y={b}", f"z={c}", "--worker", str(worker), "--rounds", "3", "--batches", "1,8",
            "--out", str(out)]  # fmt: skip
    assert ab_trees.main(argv) == 0
    assert log.read_text().split() == ["x", "y", "z", "y", "z", "x", "z", "x", "y"]
    data = json.loads(out.read_text())
    assert data["meta"]["card"] == "Fake GPU 80GB" and set(data["meta"]["variants"]) == {"x", "y", "z"}
    assert len(data["results"]) == 18 and len(data["lines"]) == 18
    rows = {(r["label"], r["batch"]): r for r in data["summary"]}
    # run numbers: x 1, 6, 8; y 2, 4, 9; z 3, 5, 7 -> rates 100 + n (x batch)
    assert (rows["x", 1]["min"], rows["x", 1]["median"], rows["x", 1]["max"]) == (101.0, 106.0, 108.0)
    assert rows["y", 8]["median"] == 104.0 * 8 and rows["y", 1]["vs_first"] == pytest.approx(104 / 106)
    assert all(r["same_tokens"] and r["runs"] == 3 for r in data["summary"])
    assert not list(tmp_path.glob(".ab.json.*"))  # no temporary left

    log.unlink()
    monkeypatch.setenv("FAKE_FAIL", "2")
    monkeypatch.setenv("FAKE_TOKENS", "other")
    assert ab_trees.main([f"x={a}", f"y={b}", "--worker", str(worker), "--rounds", "2", "--batches", "1"]) == 1
    captured = capsys.readouterr()
    assert "round 0, y: exit 3" in captured.err and "boom" in captured.err
    assert len(log.read_text().split()) == 4  # the other runs went on


@pytest.mark.parametrize("name", ["out.json", "out.json.gz"])
def test_write_json_atomic_round_trips_and_leaves_nothing_on_failure(tmp_path, name):
    """kernels.write_json_atomic (every benchmark's results writer): plain or gzip JSON by the name; a
    payload that cannot be written raises and leaves neither the file nor a temporary, and an earlier
    file at the path stays as it was."""
    import gzip
    import json

    path = tmp_path / name
    kernels.write_json_atomic(path, {"a": [1, 2]})
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt") as f:
        assert json.load(f) == {"a": [1, 2]}
    with pytest.raises(TypeError):
        kernels.write_json_atomic(path, {"a": object()})
    with opener(path, "rt") as f:
        assert json.load(f) == {"a": [1, 2]}
    with pytest.raises(TypeError):
        kernels.write_json_atomic(tmp_path / "new.json", {"a": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]

