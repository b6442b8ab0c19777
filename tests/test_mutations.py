"""benchmarks/mutations.py stays meaningful: each of its bugs still matches exactly one place in today's code (a
refactor that moves the text makes this fail instead of turning the mutation into a silent no-op), and applying it
changes that file."""
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutations", REPO / "benchmarks" / "mutations.py")
mutations = importlib.util.module_from_spec(spec)
sys.modules["mutations"] = mutations  # dataclasses look their module up there
spec.loader.exec_module(mutations)


@pytest.mark.parametrize("m", mutations.MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_applies_once(m, tmp_path):
    (tmp_path / m.file).parent.mkdir(parents=True)
    original = (REPO / m.file).read_text()
    (tmp_path / m.file).write_text(original)
    mutations.apply(m, tmp_path)
    changed = (tmp_path / m.file).read_text()
    assert changed != original and changed.count(m.new) == original.count(m.new) + 1
    compile(changed, m.file, "exec")  # still Python


def test_six_named_mutations():
    assert [m.name for m in mutations.MUTATIONS] == ["sampler-sign-flip", "decoder-endpoint", "labels-shuffled",
                                                     "encoder-detached", "ema-frozen", "schedule-off-by-one"]
