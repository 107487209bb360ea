"""What a user sees at the end of `dictlearn train`: a table of each dictionary's final FVU, L0 (with its
target_l0) and dead fraction, and a progress bar that names the dictionary whose numbers it shows."""

from __future__ import annotations

import pytest

from conftest import planted, spec, train_cfg

pytestmark = pytest.mark.usefixtures("tiny_kind")


def _table(out: str) -> dict[str, list[str]]:
    lines = out[out.index("training finished"):].splitlines()[1:]
    assert lines[0].split() == ["dictionary", "kind", "step", "FVU", "L0", "target", "L0", "dead", "%"]
    return {line.split()[0]: line.split()[1:] for line in lines[1:] if line.strip()}


def test_training_ends_with_a_summary_table_of_the_last_logged_numbers(tmp_path, capsys):
    import dictlearn.decomposers as D
    from dictlearn.trainers.data import ArraySource
    from dictlearn.trainers.logging import WandbConfig, read_log
    from dictlearn.trainers.sgd import DecomposerSpec, train

    relu = D.build("relu", {"d_in": 16, "n_features": 32, "hookpoint_in": "act", "target_l0": 4.0}).config
    specs = [spec(tmp_path), DecomposerSpec(name="matched", kind="relu", config=relu, folder=tmp_path / "decomposers" / "matched")]
    result = train(specs, ArraySource({"act": planted(n_rows=1024)}, batch_size=64, seed=0),
                   train_cfg(n_steps=30, log_every=10, checkpoint_every=30), WandbConfig(mode="disabled"))
    table = _table(capsys.readouterr().out)
    assert sorted(table) == ["matched", "tiny"]
    for name, kind, target in (("tiny", "test_tiny_relu", "-"), ("matched", "relu", "4")):
        last = read_log(result.folders[name] / "train_log.jsonl")[-1]
        assert table[name] == [kind, "30", f"{last['fvu']:.4f}", f"{last['l0']:.1f}", target,
                               f"{100 * last['dead_frac']:.1f}"]


def test_the_progress_bar_names_the_dictionary_it_shows(tmp_path):
    from dictlearn.trainers.logging import TrainLogger, WandbConfig

    paths = {name: tmp_path / name / "train_log.jsonl" for name in ("topk-16x", "relu")}
    logger = TrainLogger(tmp_path, paths, WandbConfig(mode="disabled"), {}, n_steps=10, start_step=0, progress=True)
    logger.log(5, {"topk-16x": {"loss": 0.5, "fvu": 0.25, "l0": 32.0}, "relu": {"loss": 0.7, "fvu": 0.3, "l0": 40.0}})
    assert logger.bar.postfix == "topk-16x: loss 0.5 fvu 0.25 l0 32 (+1 more)"
    logger.close(failed=True)  # a failed run prints no table
