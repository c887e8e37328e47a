"""Hostile and careless outputs: nothing the user gave is ever overwritten or
deleted, locks are never followed through links, and a run killed while
publishing is finished or rolled back by the next one."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmslim.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash (links recorded as links)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link->" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _refused(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.mark.parametrize("where", ["model", "model-parent", "inside-model", "recipe-dir", "recipe-parent",
                                   "dataset", "dataset-parent"])
@pytest.mark.parametrize("force", [False, True])
def test_output_over_an_input_is_refused_at_validation(local_model, recipe_writer, workdir, where, force):
    outputs = {"model": local_model, "model-parent": local_model.parent, "inside-model": local_model / "out",
               "recipe-dir": workdir, "recipe-parent": workdir.parent, "dataset": workdir / "data" / "test.txt",
               "dataset-parent": workdir / "data"}
    recipe = recipe_writer(local_model, output=str(outputs[where]))
    before = snapshot(workdir)
    result = invoke("run", recipe, *(["--force"] if force else []))
    _refused(result, f"{recipe.name}:", "output:")
    assert snapshot(workdir) == before
    _refused(invoke("validate", recipe), "output:")


def test_output_over_the_teacher_is_refused(local_model, recipe_writer, workdir):
    teacher = workdir / "teacher"
    shutil.copytree(local_model, teacher)
    steps = (f"  - distill: {{dataset: text:./data/train.txt, teacher: {teacher}, tokens: 64, seqlen: 16, "
             "batch_size: 2}")
    recipe = recipe_writer(local_model, steps=steps, output=str(teacher / "sub"))
    before = snapshot(workdir)
    _refused(invoke("run", recipe, "--force"), "the teacher of step 1")
    assert snapshot(workdir) == before


def test_output_through_a_link_to_the_model_is_refused(local_model, recipe_writer, workdir):
    (workdir / "alias").symlink_to(local_model, target_is_directory=True)
    recipe = recipe_writer(local_model, output="./alias")
    before = snapshot(workdir)
    _refused(invoke("run", recipe, "--force"), "is the input model")
    assert snapshot(workdir) == before


def test_output_whose_parent_is_a_file(local_model, recipe_writer, workdir):
    (workdir / "afile").write_text("x")
    recipe = recipe_writer(local_model, output="./afile/out")
    _refused(invoke("validate", recipe), "is a file, not a folder")


def test_force_never_deletes_a_folder_llmslim_did_not_write(local_model, recipe_writer, workdir):
    mine = workdir / "out" / "w4-rtn"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    recipe = recipe_writer(local_model)
    before = snapshot(workdir)
    _refused(invoke("run", recipe, "--force"), "not written by llmslim")
    assert snapshot(workdir) == before


def test_force_keeps_the_users_files_inside_an_output(local_model, recipe_writer, workdir):
    recipe = recipe_writer(local_model)
    assert invoke("run", recipe).exit_code == 0
    notes = workdir / "out" / "w4-rtn" / "notes.txt"
    notes.write_text("mine")
    _refused(invoke("run", recipe, "--force"), "notes.txt")
    assert notes.read_text() == "mine"


def test_lock_never_follows_a_planted_link(local_model, recipe_writer, workdir):
    victim = workdir / "victim.txt"
    victim.write_text("precious")
    (workdir / "out").mkdir()
    (workdir / "out" / ".w4-rtn.lock").symlink_to(victim)
    result = invoke("run", recipe_writer(local_model))
    _refused(result, "symbolic link")
    assert victim.read_text() == "precious"


def test_stale_lock_of_a_dead_process_is_taken_over(local_model, recipe_writer, workdir):
    (workdir / "out").mkdir()
    lock = workdir / "out" / ".w4-rtn.lock"
    lock.write_text(json.dumps({"pid": 999_999_999, "host": socket.gethostname(), "started": "yesterday"}))
    result = invoke("run", recipe_writer(local_model))
    assert result.exit_code == 0, result.output
    assert "stale lock" in result.output
    assert not lock.exists()


def test_lock_of_another_host_is_respected(local_model, recipe_writer, workdir):
    (workdir / "out").mkdir()
    lock = workdir / "out" / ".w4-rtn.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "some-other-host", "started": "now"}))
    _refused(invoke("run", recipe_writer(local_model)), "some-other-host")
    assert lock.exists()


def test_live_lock_is_respected(local_model, recipe_writer, workdir):
    from llmslim.workspace import OutputLock

    with OutputLock(workdir / "out" / "w4-rtn"):
        _refused(invoke("run", recipe_writer(local_model)), "being written by")


def _published(workdir: Path, local_model, recipe_writer) -> tuple[Path, Path]:
    recipe = recipe_writer(local_model)
    assert invoke("run", recipe).exit_code == 0
    return recipe, workdir / "out" / "w4-rtn"


def test_complete_staging_left_by_a_killed_swap_is_published(local_model, recipe_writer, workdir):
    recipe, out = _published(workdir, local_model, recipe_writer)
    good = snapshot(out)
    os.replace(out, out.parent / ".w4-rtn.staging-4242")  # killed between the two renames:
    shutil.copytree(out.parent / ".w4-rtn.staging-4242", out.parent / ".w4-rtn.old-4242")  # old moved aside
    result = invoke("run", recipe)
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    assert snapshot(out) == good
    assert sorted(p.name for p in out.parent.iterdir()) == ["w4-rtn"]


def test_incomplete_staging_is_removed_and_the_previous_output_restored(local_model, recipe_writer, workdir):
    recipe, out = _published(workdir, local_model, recipe_writer)
    good = snapshot(out)
    staged = out.parent / ".w4-rtn.staging-4242"
    shutil.copytree(out, staged)
    (staged / "model.safetensors").write_bytes(b"torn")  # the report lists another size
    os.replace(out, out.parent / ".w4-rtn.old-4242")
    result = invoke("run", recipe)
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    assert snapshot(out) == good
    assert sorted(p.name for p in out.parent.iterdir()) == ["w4-rtn"]


def test_legacy_leftovers_are_cleaned(local_model, recipe_writer, workdir):
    recipe, out = _published(workdir, local_model, recipe_writer)
    shutil.copytree(out, out.parent / ".w4-rtn.tmp-77")
    (out.parent / ".w4-rtn.tmp-77" / "report.json").unlink()
    assert invoke("run", recipe).exit_code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["w4-rtn"]


def test_up_to_date_only_when_the_output_is_complete(local_model, recipe_writer, workdir):
    recipe, out = _published(workdir, local_model, recipe_writer)
    (out / "model.safetensors").unlink()
    result = invoke("run", recipe)
    assert result.exit_code == 0 and "incomplete" in result.output, result.output
    assert (out / "model.safetensors").is_file()


def test_no_space_before_a_step_checkpoint_keeps_the_previous_output(local_model, recipe_writer, workdir,
                                                                      monkeypatch):
    recipe, out = _published(workdir, local_model, recipe_writer)
    good = snapshot(out)
    import llmslim.publish

    monkeypatch.setattr(llmslim.publish.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    result = invoke("run", recipe, "--set", "steps.0.rtn.bits=3")
    assert result.exit_code == 1, result.output
    assert "not enough free space" in result.output and "Traceback" not in result.output
    assert snapshot(out) | {".last-failed-report.json": ""} == good | {".last-failed-report.json": ""}
    failed = json.loads((out / ".last-failed-report.json").read_text())
    assert failed["status"] == "failed" and "free space" in failed["error"]


def test_disk_full_while_publishing_keeps_the_step_checkpoint(local_model, recipe_writer, workdir, monkeypatch):
    import llmslim.outcome

    recipe = recipe_writer(local_model)
    real = llmslim.outcome.write_extras

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(llmslim.outcome, "write_extras", full)
    result = invoke("run", recipe)
    assert result.exit_code == 1 and "no space left" in result.output.lower(), result.output
    assert "internal error" not in result.output
    work = next((workdir / "out" / ".w4-rtn.work").iterdir())
    assert (work / "step-0").is_dir() and (work / "step-0.json").is_file()
    monkeypatch.setattr(llmslim.outcome, "write_extras", real)
    again = invoke("run", recipe)
    assert again.exit_code == 0 and "resuming after step 1" in again.output, again.output
    assert (workdir / "out" / "w4-rtn" / "model.safetensors").is_file()


def test_unwritable_output_folder_is_refused(local_model, recipe_writer, workdir, monkeypatch):
    import llmslim.recipe.output_checks as checks

    (workdir / "out").mkdir()
    real = os.access
    denied = str(workdir / "out")  # root may write anywhere: pretend this folder is read-only
    monkeypatch.setattr(checks.os, "access", lambda path, mode: str(path) != denied and real(path, mode))
    _refused(invoke("validate", recipe_writer(local_model)), "permission denied")


KILL_BETWEEN_RENAMES = """
import os, signal, sys
import llmslim.publish as publish
real = os.replace
def replace(src, dst):
    real(src, dst)
    if ".old-" in str(dst):  # the previous output was just moved aside: die before the new one is in place
        os.kill(os.getpid(), signal.SIGKILL)
publish.os.replace = replace
from llmslim.cli import app
sys.argv = ["llmslim", "run", sys.argv[1], "--set", "steps.0.rtn.bits=3"]
app()
"""


def test_kill_9_between_the_renames_is_finished_by_the_next_run(local_model, recipe_writer, workdir):
    import subprocess
    import sys

    recipe, out = _published(workdir, local_model, recipe_writer)
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(recipe)], capture_output=True,
                            text=True, cwd=workdir, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists(), "killed with the previous output moved aside and the new one not yet in place"
    result = invoke("run", recipe, "--set", "steps.0.rtn.bits=3")
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    assert json.loads((out / "report.json").read_text())["recipe"]["steps"][0]["rtn"]["bits"] == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["w4-rtn"]
