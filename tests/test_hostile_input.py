"""Hostile and careless recipe and CLI input: every case gets a located, readable
message and the right exit code, never a traceback, and leaves every file it found
as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmslim import cli
from llmslim.cli import app
from llmslim.data import DatasetSpec, load_documents
from llmslim.errors import UsageError
from llmslim.recipe import load_recipe
from tests.conftest import write_recipe

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: relative path -> (size, sha256)."""
    return {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def expect(result, code: int, *fragments: str) -> str:
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out, out
    for fragment in fragments:
        assert fragment in out, (fragment, out)
    return out


@pytest.fixture
def base(model_factory, workdir):
    """A valid recipe text on the tiny llama, written as ``r.yaml`` by ``write``; files snapshotted."""
    model = model_factory("llama")
    lines = ["version: 1", "name: hostile", f"model: {model}", "seed: 0", "calibration:",
             "  dataset: text:./data/train.txt", "  samples: 4", "  seqlen: 32", "steps:",
             "  - rtn: {bits: 4, group_size: 32}", "output: ./out/hostile"]

    def write(text: str | bytes | None = None, name: str = "r.yaml") -> Path:
        path = workdir / name
        data = "\n".join(lines) + "\n" if text is None else text
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return path

    write.lines = lines
    return write


def validate_fails(workdir: Path, path: Path, *fragments: str, extra=()) -> str:
    before = snapshot(workdir)
    out = expect(invoke("validate", path, *extra), 2, *fragments)
    assert snapshot(workdir) == before
    return out


def test_duplicate_keys_name_both_lines(base, workdir):
    text = "\n".join(base.lines).replace("seed: 0", "seed: 0\nseed: 1")
    text = text.replace("{bits: 4, group_size: 32}", "{bits: 4, bits: 3, group_size: 32}")
    validate_fails(workdir, base(text), "r.yaml:5: seed: duplicate key 'seed' (first at line 4)",
                   "r.yaml:11: steps.0.rtn.bits: duplicate key 'bits' (first at line 11)")


def test_alias_bomb_fails_fast(base, workdir):
    bomb = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        bomb.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    text = "\n".join(base.lines) + "\nlol:\n" + "\n".join("  " + b for b in bomb) + "\n"
    start = time.perf_counter()
    validate_fails(workdir, base(text), "r.yaml:", "expands to more than 20000 values")
    assert time.perf_counter() - start < 1.0


def test_too_many_aliases(base, workdir):
    text = "\n".join(base.lines) + "\nx: &x 1\ny: [" + ", ".join(["*x"] * 101) + "]\n"
    validate_fails(workdir, base(text), "r.yaml:13: invalid YAML: more than 100 aliases")


@pytest.mark.parametrize("char, code", [("\x00", "U+0000"), ("\x1b", "U+001B"), ("\x7f", "U+007F")])
def test_control_characters_are_located(base, workdir, char, code):
    text = "\n".join(base.lines).replace("name: hostile", f"name: host{char}ile")
    validate_fails(workdir, base(text), f"r.yaml:2: control character {code} at column 11 is not allowed")


def test_deep_nesting(base, workdir):
    text = "\n".join(base.lines) + "\nx: " + "[" * 5000 + "]" * 5000 + "\n"
    validate_fails(workdir, base(text), "r.yaml:12: invalid YAML: nested deeper than 32 levels")


def test_yaml_value_python_cannot_build(base, workdir):
    text = "\n".join(base.lines).replace("name: hostile", "name: 2024-13-45")
    validate_fails(workdir, base(text), "r.yaml:2: invalid YAML: cannot read the value '2024-13-45'")


def test_non_utf8_recipe(base, workdir):
    validate_fails(workdir, base(b"version: 1\nname: caf\xe9\n"),
                   "r.yaml: not UTF-8 text: byte 0xe9 at byte offset 20")


def test_recipe_that_is_a_folder(base, workdir):
    (workdir / "folder.yaml").mkdir()
    validate_fails(workdir, workdir / "folder.yaml", "folder.yaml: is a folder, not a recipe file")


@pytest.mark.parametrize("field, value, message", [
    ("seed: 0", "seed: 100000000000000000000000000000", "seed: Input should be less than or equal to 4294967295"),
    ("seed: 0", "seed: -1", "seed: Input should be greater than or equal to 0"),
    ("samples: 4", "samples: 10000000000000000000000", "calibration.samples: Input should be less than or equal "
     "to 1000000"),
    ("seqlen: 32", "seqlen: 99999999999", "calibration.seqlen: Input should be less than or equal to 1048576"),
])
def test_huge_numbers_are_rejected_at_validation(base, workdir, field, value, message):
    text = "\n".join(base.lines).replace(field, value)
    validate_fails(workdir, base(text), message)


@pytest.mark.parametrize("steps, message", [
    ("  - distill: {dataset: text:./data/train.txt, lr: .inf}", "steps[0].distill.lr: Input should be a finite number"),
    ("  - distill: {dataset: text:./data/train.txt, temperature: .nan}", "steps[0].distill.temperature: Input should be a finite number"),
    ("  - distill: {dataset: text:./data/train.txt, tokens: 1e400}", "steps[0].distill.tokens:"),
    ("  - prune: {mlp: {keep: 99999999999999}}", "steps[0].prune.mlp"),
])
def test_non_finite_and_huge_step_numbers(base, workdir, steps, message):
    text = "\n".join(base.lines).replace("  - rtn: {bits: 4, group_size: 32}", steps)
    validate_fails(workdir, base(text), "r.yaml:10: " + message)


def test_non_finite_budget(base, workdir):
    text = "\n".join(base.lines) + "\nbudgets: {max_size_mb: .inf}\n"
    validate_fails(workdir, base(text), "r.yaml:12: budgets.max_size_mb: Input should be a finite number")


def test_non_utf8_dataset_named_with_byte_offset(base, workdir):
    bad = workdir / "data" / "train.txt"
    bad.write_bytes(b"fine text\n\n" * 3 + b"caf\xe9\n")
    out = validate_fails(workdir, base(), "r.yaml:6: calibration.dataset:",
                         f"{bad}: not UTF-8 text: byte 0xe9 at byte offset 36")
    assert "re-save the file as UTF-8" in out
    with pytest.raises(UsageError, match="byte 0xe9 at byte offset 36"):
        load_documents(DatasetSpec("text", path=bad))
    (workdir / "d.jsonl").write_bytes(b'{"t": "a"}\n{"t": "\xff"}\n')
    with pytest.raises(UsageError, match="d.jsonl: not UTF-8 text: byte 0xff at byte offset 18"):
        load_documents(DatasetSpec("jsonl", path=workdir / "d.jsonl", field="t"))


def test_text_dataset_newlines_unchanged(workdir):
    (workdir / "n.txt").write_bytes(b"one\r\ntwo\r\n\r\nthree\rfour\n")
    assert load_documents(DatasetSpec("text", path=workdir / "n.txt")) == ["one\ntwo", "three\nfour"]


def test_set_value_is_blamed_on_set(base, workdir):
    path = base()
    out = validate_fails(workdir, path, "--set steps.0.rtn.bits=5: steps[0].rtn: format gptq packs 2, 3, 4 or 8 "
                         "bits, not 5", extra=["--set", "steps.0.rtn.bits=5"])
    assert "r.yaml:10" in out  # the recipe's part of the combination is pointed at, not blamed
    assert not any(line.startswith(str(path)) for line in out.splitlines()), out
    validate_fails(workdir, path, "--set steps.0.rtn.bits=12: steps[0].rtn.bits: Input should be less than or "
                   "equal to 8", extra=["--set", "steps.0.rtn.bits=12"])
    validate_fails(workdir, path, "--set steps.3.rtn.bits=4: steps has no item 3 (it has 1",
                   extra=["--set", "steps.3.rtn.bits=4"])
    validate_fails(workdir, path, "--set seed.x=1: seed is a single value", extra=["--set", "seed.x=1"])
    validate_fails(workdir, path, "--set calibration.sampels=8: calibration.sampels: unknown key 'sampels' "
                   "(did you mean 'samples'?); the recipe has no calibration.sampels",
                   extra=["--set", "calibration.sampels=8"])
    validate_fails(workdir, path, "--set =3: expected KEY.PATH=VALUE", extra=["--set", "=3"])


def test_set_creating_a_section_says_so(base, workdir):
    text = "\n".join(line for line in base.lines if not line.startswith(("calibration", "  dataset", "  samples",
                                                                         "  seqlen")))
    out = validate_fails(workdir, base(text), "--set calibration.samples=8: calibration.dataset: required field is "
                         "missing; the recipe has no calibration, --set created it",
                         extra=["--set", "calibration.samples=8"])
    assert "r.yaml:1" not in out


def test_name_defaults_to_file_stem(base, workdir):
    text = "\n".join(line for line in base.lines if not line.startswith("name:"))
    assert load_recipe(base(text, name="w4-quick.yaml")).name == "w4-quick"
    validate_fails(workdir, base(text, name="my recipe.yaml"), "my recipe.yaml: name: the recipe has no `name:` and "
                   "its file name 'my recipe' is not a valid name", "set `name:` in the recipe")


def test_eval_on_missing_folder(workdir):
    before = snapshot(workdir)
    expect(invoke("eval", "./no-such-model", "--dataset", "text:./data/test.txt"), 2,
           f"model folder not found: {workdir / 'no-such-model'}")
    expect(invoke("eval", "data/test.txt", "--dataset", "text:./data/test.txt"), 2, "a file, not a model folder")
    assert snapshot(workdir) == before


@pytest.mark.parametrize("args, message", [
    (["--seqlen", "0"], "--seqlen must be at least 2"),
    (["--seqlen", "99999999999999999"], "--seqlen must be at least 2 and at most 1,048,576"),
    (["--max-windows", "0"], "--max-windows must be at least 1"),
    (["--dataset", "text:./data/nope.txt"], "file not found"),
    (["--dataset", "csv:x"], "--dataset: dataset 'csv:x' must be one of"),
])
def test_eval_option_values(model_factory, workdir, args, message):
    if "--dataset" not in args:
        args = args + ["--dataset", "text:./data/test.txt"]
    out = expect(invoke("eval", model_factory("llama"), *args), 2, message)
    assert "pydantic" not in out


def test_report_inputs_that_are_not_reports(workdir):
    (workdir / "dir-report" / "report.json").mkdir(parents=True)
    (workdir / "bad.json").write_text("{not json")
    (workdir / "other.json").write_text('{"a": 1}')
    (workdir / "old.json").write_text('{"schema_version": 1, "status": "passed"}')
    before = snapshot(workdir)
    expect(invoke("report", workdir / "dir-report"), 2, "report.json is a folder, not a report file")
    expect(invoke("report", workdir / "bad.json"), 2, "bad.json: not a report: not JSON (line 1, column 2")
    expect(invoke("report", workdir / "other.json"), 2, "other.json: not an llmslim report")
    expect(invoke("report", workdir / "old.json"), 2, "old.json: not a valid llmslim report (")
    expect(invoke("report", workdir / "data"), 2, "data: no report.json here")
    assert snapshot(workdir) == before


def test_markup_in_paths_is_shown_literally(base, workdir, model_factory, monkeypatch):
    monkeypatch.setattr(cli.err_console, "width", 2000)
    model = workdir / "m[bold]x[/]"
    shutil.copytree(model_factory("llama"), model)
    text = "\n".join(base.lines).replace(f"model: {model_factory('llama')}", "model: ./m[bold]x[/]")
    one = base(text.replace("./out/hostile", "'./out/[/]w'"), name="one.yaml")
    two = base(text.replace("name: hostile", "name: two").replace("./out/hostile", "./out/[red]two"), name="two.yaml")
    out = expect(invoke("run", one, two, "--dry-run"), 0, "m[bold]x[/]", "out/[/]w", "out/[red]two", "summary")
    assert "planned" in out
    broken = base("version: 1\n", name="[b]broken.yaml")
    expect(invoke("run", one, broken, "--dry-run"), 2, "[b]broken.yaml", "summary")
    expect(invoke("validate", one), 0, "one.yaml: ok")


def test_sigterm_exits_143(base, workdir, monkeypatch):
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr("llmslim.pipeline.run_recipe", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    expect(invoke("run", base()), 143, "terminated (completed steps are kept; rerun to resume)")
    assert signal.getsignal(signal.SIGTERM) is previous
    help_text = invoke("run", "--help").output
    assert "130 interrupted" in help_text and "143 terminated" in help_text


def test_debug_shows_step_traceback(base, workdir, monkeypatch):
    from llmslim.recipe.steps import RtnConfig
    from llmslim.steps import HANDLERS

    def boom(model, config, ctx):
        raise RuntimeError("kaboom in rtn")

    monkeypatch.setitem(HANDLERS, RtnConfig, boom)
    path = base()
    result = invoke("run", path, env={"LLMSLIM_DEBUG": "1"})
    assert result.exit_code == 1, result.output
    assert "kaboom in rtn" in result.output and "Traceback" in result.output and "in boom" in result.output
    quiet = invoke("run", path, "--force", env={"LLMSLIM_DEBUG": ""})
    assert quiet.exit_code == 1 and "kaboom in rtn" in quiet.output and "Traceback" not in quiet.output


@pytest.mark.parametrize("arch, modules", [("opt", 12), ("llama", 14)])
def test_quiet_run_shows_no_future_warning_and_readable_steps(model_factory, workdir, arch, modules):
    import warnings

    model = model_factory(arch)  # its forward warns that `past_key_values` is deprecated while decoding
    recipe = write_recipe(workdir, model, name="opt", output="./out/opt").read_text()
    recipe = recipe.replace("{prompt_tokens: 8, new_tokens: 4, repeats: 2}",
                            "{prompt_tokens: 4, new_tokens: 3, repeats: 1, warmup: 0}")
    path = workdir / "opt.yaml"
    path.write_text(recipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expect(invoke("run", path, "--quiet"), 0)
    leaked = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not leaked, leaked
    shown = expect(invoke("report", workdir / "out" / "opt"), 0, "summary", f"modules_quantized={modules}")
    assert "{" not in shown and "weights_quantized=" in shown
