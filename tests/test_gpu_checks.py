"""The one device command (benchmarks/gpu_checks.py): its CPU dry run passes every part and writes one
result line each; a failing or slow part is recorded and the rest still run; the GPU plan names files that
exist and fits the device command's time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from benchmarks.gpu_checks import Check, Sizes, checks, run_check, summary
from tests.conftest import REPO

FIELDS = {"name", "ok", "seconds", "figures", "error"}


@pytest.mark.slow
def test_the_dry_run_runs_every_part_on_cpu_and_writes_one_line_per_check(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "benchmarks/gpu_checks.py", "--cpu-dry-run", "--out", str(out), "--work", str(work)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert done.returncode == 0, "\n".join(f"{r['name']}: {r['error']}" for r in results if not r["ok"])
    assert [r["name"] for r in results] == [c.name for c in checks(Sizes.of(True), work)]
    assert all(set(r) == FIELDS and r["ok"] and r["error"] is None for r in results)
    by_name = {r["name"].split(":")[0]: r["figures"] for r in results}
    trained = by_name["XL/4 256 px through pixelflow train"]
    assert trained["metrics"]["step"] == 6 and trained["grids"] == ["step_00000004.png"]
    assert trained["checkpoints"][-1] == "step_00000006"  # resumed from step 4 and went on
    old, new = (r["figures"]["lines"][0] for r in results if r["name"].startswith("train step at"))
    assert old["micro_batches"] == 4 and set(old["profile"]["share"]) >= {"matmul", "attention"}
    assert new["micro_tokens"] == 256
    assert {line["mode"] for line in by_name["checkpoint save sync vs async (FSDP2, world size 1)"]["lines"]} == {
        "sync",
        "async",
    }
    assert "fid" in by_name["eval with FID (random Inception weights)"]
    ranks = [r["figures"] for r in results if r["name"].startswith("two gloo ranks")]
    assert len(ranks) == 3 and len({round(f["loss"], 5) for f in ranks}) == 1  # the same losses on every layout
    assert re.search(r"13 of 13 checks passed", done.stdout)


def test_a_failing_or_slow_part_is_recorded_and_the_rest_run_and_a_part_past_the_budget_is_skipped():
    python = sys.executable
    failing = Check("fails", 30, [[python, "-c", "import sys; print('{\"a\": 1}'); sys.exit('broken part')"]])
    slow = Check("slow", 5, [[python, "-c", "import time; time.sleep(30)"]])
    fine = Check("fine", 30, [[python, "-c", "print('{\"b\": 2}')"]])
    far = time.perf_counter() + 60
    results = [run_check(check, far, False, {}) for check in (failing, slow, fine)]
    assert results[0]["ok"] is False and "broken part" in results[0]["error"]
    assert results[0]["figures"] == {"lines": [{"a": 1}]}  # what it printed before failing is kept
    assert results[1]["ok"] is False and results[1]["error"].endswith("timed out after 5 s")
    assert results[1]["seconds"] < 10
    assert results[2]["ok"] is True and results[2]["figures"] == {"lines": [{"b": 2}]} and results[2]["error"] is None
    past = run_check(fine, time.perf_counter(), False, {})
    assert past["error"] == "skipped: out of time"
    table = summary(results)
    assert table.splitlines()[-1] == "1 of 3 checks passed" and "broken part" in table


def test_the_gpu_plan_names_files_that_exist_and_fits_one_device_command(tmp_path):
    plan = checks(Sizes.of(False), tmp_path)
    for check in plan:
        for command in check.commands:
            for word in command:
                if re.fullmatch(r"(configs|benchmarks)/[\w./-]+", word):
                    assert (REPO / word).is_file(), (check.name, word)
    script = (REPO / "benchmarks" / "gpu_checks.sh").read_text()
    limit = int(re.search(r"timeout (\d+) python3 benchmarks/gpu_checks.py", script).group(1))
    budget = float(re.search(r"--budget-s (\d+)", script).group(1))
    assert budget < limit <= 8 * 60 - 20  # the device command's 8 minutes, with the wheels' install
