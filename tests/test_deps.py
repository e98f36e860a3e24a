"""The house's rules, read from the code: each DVC stage's deps name exactly the petpark modules it runs, and no
production module imports the test helpers, or the HTTP app unless it starts one"""
import pytest, yaml
from petpark.core import PIPELINE_STAGES
from petpark.pipeline import module_imports, stage_code
from conftest import ROOT

STAGES = yaml.safe_load((ROOT/'dvc.yaml').read_text())['stages']


def test_the_pipeline_stages_are_dvc_yaml_s():
    assert list(STAGES) == list(PIPELINE_STAGES)


@pytest.mark.parametrize('stage', PIPELINE_STAGES)
def test_a_stage_depends_on_exactly_the_code_it_runs(stage):
    have = sorted(d for d in STAGES[stage]['deps'] if d.startswith('petpark/'))
    assert have == stage_code(stage), f'dvc.yaml {stage} deps: add {sorted(set(stage_code(stage)) - set(have))}, drop {sorted(set(have) - set(stage_code(stage)))}'


def test_production_code_imports_no_test_helper_and_the_app_only_to_serve_it():
    imports = {p.stem: module_imports(p.read_text()) for p in (ROOT/'petpark').glob('*.py') if p.stem not in ('_modidx', 'testing')}
    assert [m for m, i in imports.items() if 'testing' in i] == []
    assert sorted(m for m, i in imports.items() if 'serve' in i) == ['bench_serve']  # `bench_server` runs the app in its own process


def test_the_derivation_sees_lazy_imports_and_skips_lessons(tmp_path):
    assert module_imports('def f():\n    from petpark.registry import Registry') == {'registry'}
    assert 'petpark/testing.py' not in stage_code('evaluate') and 'petpark/figures.py' in stage_code('evaluate')  # a report cell draws its figure
