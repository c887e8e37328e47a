"""Recipe validation: the issue's recipe as written, and each error located."""

from __future__ import annotations


import pytest

from llmslim.errors import RecipeError
from llmslim.recipe import load_recipe

ISSUE_RECIPE = """\
version: 1
name: w4-rtn
model: ./models/my-llama            # a local HF model folder, or a hub id
dtype: float32                      # float32 | bfloat16 | float16 | auto
device: auto                        # auto = cuda when present, else cpu
seed: 0
calibration:
  dataset: text:./data/train.txt    # also jsonl:PATH#field, builtin:NAME
  samples: 64
  seqlen: 256
steps:
  - rtn: {bits: 4, group_size: 128, sym: true}
evaluate:
  perplexity: {dataset: text:./data/test.txt, seqlen: 256}
  latency: {prompt_tokens: 64, new_tokens: 32, repeats: 3}
budgets:
  max_perplexity_increase: 5%       # relative to the original model, measured in the same run
  max_size_mb: 200
output: ./out/w4-rtn
"""


@pytest.fixture
def issue_dir(workdir, model_factory):
    (workdir / "models").mkdir()
    (workdir / "models" / "my-llama").symlink_to(model_factory("llama"))
    return workdir


def problems_of(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return [str(p) for p in info.value.problems]


def test_issue_recipe_accepted_as_written(issue_dir):
    path = issue_dir / "recipe.yaml"
    path.write_text(ISSUE_RECIPE)
    recipe = load_recipe(path)
    assert recipe.steps[0].bits == 4 and recipe.steps[0].group_size == 128
    assert recipe.budgets.max_perplexity_increase == pytest.approx(0.05)
    assert recipe.output == str(issue_dir / "out" / "w4-rtn")
    assert recipe.calibration.dataset == f"text:{issue_dir / 'data' / 'train.txt'}"
    assert recipe.model == str((issue_dir / "models" / "my-llama").resolve())


def test_paths_are_relative_to_the_recipe_folder(issue_dir, tmp_path_factory, monkeypatch):
    path = issue_dir / "recipe.yaml"
    path.write_text(ISSUE_RECIPE)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert load_recipe(path).output == str(issue_dir / "out" / "w4-rtn")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("{bits: 4, group_size: 128, sym: true}", "{bitz: 4}", ":12: steps[0].rtn.bitz: unknown key 'bitz' (did you mean 'bits'?)"),
        ("{bits: 4, group_size: 128, sym: true}", "{bits: 9}", ":12: steps[0].rtn.bits: Input should be less than or equal to 8 (got 9)"),
        ("{bits: 4, group_size: 128, sym: true}", "{bits: four}", ":12: steps[0].rtn.bits: Input should be a valid integer"),
        ("{bits: 4, group_size: 128, sym: true}", "{group_size: 3}", ":12: steps[0].rtn.group_size: must be -1"),
        ("  - rtn:", "  - rtm:", ":12: steps[0].rtm: unknown step 'rtm' (did you mean 'rtn'?)"),
        ("samples: 64", "sample: 64", ":9: calibration.sample: unknown key 'sample' (did you mean 'samples'?)"),
        ("samples: 64", "samples: -1", ":9: calibration.samples: Input should be greater than 0"),
        ("max_size_mb: 200", "max_sise_mb: 200", ":18: budgets.max_sise_mb: unknown key 'max_sise_mb' (did you mean 'max_size_mb'?)"),
        ("5%       #", "five    #", ":17: budgets.max_perplexity_increase: expected a percentage"),
        ("dtype: float32", "dtype: float8", ":4: dtype: Input should be 'float32', 'bfloat16', 'float16' or 'auto'"),
        ("device: auto", "device: tpu", ":5: device: String should match pattern"),
        ("version: 1", "version: 2", ":1: version: Input should be 1"),
        ("text:./data/train.txt", "text:./data/missing.txt", ":8: calibration.dataset: file not found"),
        ("text:./data/train.txt", "csv:./data/train.txt", ":8: calibration.dataset: dataset 'csv:./data/train.txt' must be one of"),
        ("text:./data/train.txt", "builtin:nope", ":8: calibration.dataset: unknown builtin dataset 'nope'"),
        ("./models/my-llama ", "./models/missing ", ":3: model: model folder not found"),
        ("name: w4-rtn", "name: 'bad name'", ":2: name: String should match pattern"),
    ],
)
def test_each_error_is_located(issue_dir, old, new, expected):
    path = issue_dir / "recipe.yaml"
    assert old in ISSUE_RECIPE
    path.write_text(ISSUE_RECIPE.replace(old, new, 1))
    problems = problems_of(path)
    assert any(p.startswith(str(path) + expected) for p in problems), problems


def test_missing_fields_and_all_problems_reported_together(workdir):
    path = workdir / "r.yaml"
    path.write_text("version: 1\nname: x\nsteps:\n  - rtn: {bits: 1}\n  - gptqq: {}\n")
    problems = problems_of(path)
    assert any("steps[0].rtn.bits" in p for p in problems)
    assert any("unknown step 'gptqq'" in p for p in problems)
    assert any(p.endswith("model: required field is missing") for p in problems)
    assert any(p.endswith("output: required field is missing") for p in problems)


def test_yaml_syntax_error_has_a_line(workdir):
    path = workdir / "r.yaml"
    path.write_text("version: 1\nname: [unclosed\nmodel: x\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:") and "invalid YAML" in problem


def test_unsafe_yaml_tags_are_refused(workdir):
    path = workdir / "r.yaml"
    path.write_text("version: 1\nname: !!python/object/apply:os.system ['echo hi']\n")
    (problem,) = problems_of(path)
    assert "invalid YAML" in problem


def test_not_a_mapping_and_missing_file(workdir):
    path = workdir / "r.yaml"
    path.write_text("- just a list\n")
    assert "a recipe is a YAML mapping" in problems_of(path)[0]
    assert "recipe file not found" in problems_of(workdir / "nope.yaml")[0]


def test_step_shape_errors(issue_dir):
    path = issue_dir / "r.yaml"
    path.write_text(ISSUE_RECIPE.replace("  - rtn: {bits: 4, group_size: 128, sym: true}", "  - rtn: 4\n  - {rtn: {}, x: 1}"))
    problems = problems_of(path)
    assert any("steps[0].rtn: step options must be a mapping" in p for p in problems)
    assert any("steps[1]: each step is a mapping with exactly one key" in p for p in problems)


def test_set_overrides(issue_dir):
    path = issue_dir / "recipe.yaml"
    path.write_text(ISSUE_RECIPE)
    recipe = load_recipe(path, ["steps.0.rtn.bits=3", "calibration.samples=8", "budgets.max_size_mb=50"])
    assert recipe.steps[0].bits == 3 and recipe.calibration.samples == 8 and recipe.budgets.max_size_mb == 50
    problems = problems_of(path, ["steps.0.rtn.bits=12"])
    assert problems[0].startswith("--set steps.0.rtn.bits=12: steps[0].rtn.bits: Input should be less than or equal to 8")
    assert "expected KEY.PATH=VALUE" in problems_of(path, ["nonsense"])[0]


def test_packed_step_must_be_last_and_packable(issue_dir):
    path = issue_dir / "recipe.yaml"
    path.write_text(ISSUE_RECIPE.replace("  - rtn: {bits: 4, group_size: 128, sym: true}",
                                         "  - rtn: {bits: 4}\n  - rtn: {bits: 6}"))
    problems = problems_of(path)
    assert any(":13: steps[1].rtn: format gptq packs 2, 3, 4 or 8 bits, not 6; use format: dense" in p
               for p in problems), problems
    path.write_text(ISSUE_RECIPE.replace("  - rtn: {bits: 4, group_size: 128, sym: true}",
                                         "  - rtn: {bits: 4}\n  - rtn: {bits: 8}"))
    problems = problems_of(path)
    assert any(":12: steps[0].rtn.format: a step that packs the weights (format: gptq) must be the last" in p
               for p in problems), problems


def test_cross_checks(issue_dir):
    path = issue_dir / "recipe.yaml"
    text = ISSUE_RECIPE.replace("  perplexity: {dataset: text:./data/test.txt, seqlen: 256}\n", "")
    path.write_text(text)
    assert any("perplexity budgets need `evaluate.perplexity`" in p for p in problems_of(path))


def test_resolved_recipe_round_trips(issue_dir):
    path = issue_dir / "recipe.yaml"
    path.write_text(ISSUE_RECIPE)
    plain = load_recipe(path).to_plain()
    assert plain["steps"] == [{"rtn": {"bits": 4, "group_size": 128, "sym": True, "scale_search": "minmax",
                                       "ignore": ["lm_head"], "format": "gptq", "loaders": []}}]
    import yaml

    again = issue_dir / "again.yaml"
    again.write_text(yaml.safe_dump(plain))
    assert load_recipe(again).to_plain() == plain
