"""`target="latency"`: the measured latency table (keys, JSON, refusals) and the search under a latency budget.

Nothing here asserts a timing: the one real measurement is of a tiny model and only its structure is checked; every
search is checked against a hand-written table, whose predictions are exact.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import fields

import pytest
import torch
from conftest import random_batch, tiny_model
from transformers import Trainer, TrainingArguments

from hf_compress import GradualStructuredPruningCallback, PruningConfig, get_structure, prune
from hf_compress.cli.parser import build_parser
from hf_compress.pruning import latency_table as latency_table_module
from hf_compress.pruning.latency_search import BINS, minimum_latency
from hf_compress.pruning.latency_table import (
    LatencyTable,
    latency_key,
    latency_table_for,
    measure_latency_table,
    table_grid,
)
from hf_compress.pruning.search import select_units


def synthetic_table(
    model,
    rest: float = 10.0,
    empty: float = 2.0,
    per_head: float = 1.0,
    per_neuron: float = 0.05,
    round_to: int = 1,
    slow=lambda width: 0.0,
    **key_overrides,
) -> LatencyTable:
    """A table whose layer takes `empty + per_head * h + per_neuron * w + slow(w)` ms, for `model`'s key."""
    key = latency_key(model, 32, 128, 2)
    key = type(key)(**{**key.__dict__, **key_overrides})
    structure = get_structure(model)
    max_ffn = max(structure.ffn)
    heads, widths, fine, step = table_grid(structure.max_heads, max_ffn, round_to)

    def layer(h: int, w: int) -> float:
        return empty + per_head * h + per_neuron * w + slow(w)

    return LatencyTable(
        key=key,
        max_ffn=max_ffn,
        rest_ms=rest,
        heads=heads,
        widths=widths,
        layer_ms=[[layer(h, w) for w in widths] for h in heads],
        width_step=step,
        fine_widths=fine,
        fine_ms=[layer(0, w) for w in fine],
    )


def _scores(num_layers: int = 4, heads: int = 4, ffn: int = 48, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (
        [torch.rand(heads, generator=generator) for _ in range(num_layers)],
        [torch.rand(ffn, generator=generator) for _ in range(num_layers)],
    )


def _predicted(table: LatencyTable, selection, num_layers: int) -> float:
    live = [i for i in range(num_layers) if i not in selection.layers]
    return table.model_latency([len(selection.heads[i]) for i in live], [len(selection.ffn[i]) for i in live])


def _value(selection, head_scores, ffn_scores) -> float:
    return sum(
        float(head_scores[i][k].sum()) + float(ffn_scores[i][f].sum())
        for i, (k, f) in enumerate(zip(selection.heads, selection.ffn, strict=True))
    )


#### The table


def test_measured_table_keys_grid_and_json_round_trip(tmp_path):
    model = tiny_model("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    table = measure_latency_table(model, batch_size=2, seq_len=8, threads=1, repeats=2, warmup=1, show_progress=False)
    # The model itself is neither run nor changed: a one-layer copy is timed.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert get_structure(model).heads == (4, 4, 4, 4)
    key = table.key
    assert (key.device, key.threads, key.runtime, key.batch_size, key.seq_len) == ("cpu", 1, "pytorch", 2, 8)
    assert (key.model_type, key.model_class, key.hidden_size, key.head_dim, key.max_heads) == (
        "bert",
        "BertForSequenceClassification",
        16,
        4,
        4,
    )
    assert key.device_name and key.torch_version == torch.__version__ and key.dtype == "float32"
    assert table.heads == [0, 1, 2, 4] and table.widths == [0, 8, 16, 24] and table.max_ffn == 24
    assert table.width_step == 8 and table.fine_widths == [0, 8, 16, 24]
    assert len(table.layer_ms) == 4 and all(len(row) == 4 for row in table.layer_ms)
    assert all(v >= 0 for v in [table.rest_ms, *table.fine_ms, *itertools.chain(*table.layer_ms)])
    assert (table.repeats, table.warmup) == (2, 1) and table.created

    path = tmp_path / "latency_table.json"
    table.save(path)
    text = path.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert data["format"] == "hf-compress-latency-table" and data["version"] == 1
    assert set(data["key"]) >= {"device", "device_name", "threads", "runtime", "batch_size", "seq_len", "model_type"}
    assert set(data) >= {"rest_ms", "heads", "widths", "layer_ms", "fine_widths", "fine_ms", "width_step", "max_ffn"}
    loaded = LatencyTable.load(path)
    assert loaded == table and loaded.to_dict() == table.to_dict()
    assert loaded.layer_latency(3, 20) == table.layer_latency(3, 20)


def test_predictions_interpolate_the_grid():
    model = tiny_model("bert", intermediate_size=48)
    table = synthetic_table(model)
    assert table.layer_latency(4, 48) == pytest.approx(2 + 4 + 0.05 * 48)
    assert table.layer_latency(3, 41) == pytest.approx(2 + 3 + 0.05 * 41)
    assert table.empty_layer_ms == pytest.approx(2.0)
    assert table.model_latency([4, 0], [48, 0]) == pytest.approx(10 + (2 + 4 + 2.4) + 2)
    costs = table.unit_costs()
    assert costs.head == pytest.approx(1.0) and costs.neuron == pytest.approx(0.05)
    with pytest.raises(ValueError, match="covers 0..4 heads and 0..48 FFN neurons"):
        table.layer_latency(5, 0)


def test_slow_measurements_are_believed_and_lucky_fast_ones_are_not():
    model = tiny_model("bert", intermediate_size=48)
    # Width 41 measured 3 ms slow (as odd widths can be), width 30 3 ms fast (noise): neither is a coarse width.
    table = synthetic_table(model, slow=lambda w: {41: 3.0, 30: -3.0}.get(w, 0.0))
    assert table.layer_latency(0, 41) == pytest.approx(2 + 0.05 * 41 + 3)
    assert table.layer_latency(2, 41) == pytest.approx(2 + 2 + 0.05 * 41 + 3)
    # Costed at the trend, not at its lucky measurement: a search cannot pick it for the 3 ms it seemed to save.
    for heads in (0, 4):
        assert table.layer_latency(heads, 30) >= table.layer_latency(heads, 29)
        assert table.layer_latency(heads, 30) >= 2 + heads + 0.05 * 30 - 0.1
    # The file keeps the measurements as they were.
    assert table.fine_ms[30] == pytest.approx(2 + 0.05 * 30 - 3)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"hidden_size": 32}, "hidden_size 32 (this run: 16)"),
        ({"threads": 1}, "threads 1 (this run: 2)"),
        ({"batch_size": 8}, "batch_size 8 (this run: 32)"),
        ({"seq_len": 64}, "seq_len 64 (this run: 128)"),
        ({"device_name": "Another CPU"}, "device_name 'Another CPU'"),
        ({"model_type": "roberta"}, "model_type 'roberta'"),
        ({"torch_version": "1.0"}, "torch_version '1.0'"),
    ],
)
def test_a_table_for_another_setting_is_refused_naming_the_difference(tmp_path, change, named):
    model = tiny_model("bert")
    path = tmp_path / "latency_table.json"
    synthetic_table(model, **change).save(path)
    config = PruningConfig(target="latency", keep=0.5, latency_threads=2, latency_table=str(path))
    with pytest.raises(ValueError, match="does not fit this run") as error:
        latency_table_for(model, config, show_progress=False)
    assert named in str(error.value) and "measure a new one" in str(error.value)
    # Through `prune`: refused before anything is scored or changed.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this run"):
        prune(model, config, [random_batch()], show_progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_table_narrower_than_the_model_or_damaged_is_refused(tmp_path):
    narrow, wide = tiny_model("bert", intermediate_size=24), tiny_model("bert", intermediate_size=48)
    table = synthetic_table(narrow)
    with pytest.raises(ValueError, match=r"FFN widths up to 24 \(this model: 48\)"):
        table.check(latency_key(wide, 32, 128, 2), get_structure(wide).ffn)
    path = tmp_path / "table.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not an hf-compress latency table"):
        LatencyTable.load(path)
    data = table.to_dict()
    data["layer_ms"] = data["layer_ms"][:-1]
    with pytest.raises(ValueError, match="damaged latency table"):
        LatencyTable.from_dict(data)


def test_a_missing_table_file_is_measured_and_written_then_reused(tmp_path, monkeypatch):
    model = tiny_model("bert")
    path = tmp_path / "run" / "latency_table.json"
    calls = []

    def measure(model, *args, **kwargs):
        calls.append(args)
        return synthetic_table(model)

    monkeypatch.setattr(latency_table_module, "measure_latency_table", measure)
    config = PruningConfig(target="latency", keep=0.5, latency_threads=2, latency_table=str(path))
    first = latency_table_for(model, config, show_progress=False)
    assert path.is_file() and calls == [(32, 128, 2)]
    assert latency_table_for(model, config, show_progress=False) == first and len(calls) == 1
    # A run's own table (fallback) of another setting is measured again, with a warning, and replaced.
    fallback = tmp_path / "fallback.json"
    synthetic_table(model, batch_size=8).save(fallback)
    unset = PruningConfig(target="latency", keep=0.5, latency_threads=2)
    table = latency_table_for(model, unset, fallback_path=fallback, show_progress=False)
    assert len(calls) == 2 and LatencyTable.load(fallback) == table and table.key.batch_size == 32


#### The search


@pytest.mark.parametrize("keep", [0.95, 0.7, 0.5, 0.35, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_search_meets_the_budget(keep, seed):
    model = tiny_model("bert", intermediate_size=48)
    table = synthetic_table(model, slow=lambda w: 0.4 * (w % 3))
    head_scores, ffn_scores = _scores(seed=seed)
    total = table.model_latency(get_structure(model).heads, get_structure(model).ffn)
    config = PruningConfig(target="latency", keep=keep, round_to=1)
    selection = select_units(head_scores, ffn_scores, config, table.unit_costs(), latency_table=table)
    predicted = _predicted(table, selection, 4)
    assert predicted <= keep * total + 1e-9
    # Close below it: the discretisation loses at most one step per layer; the shapes are a few tenths of a ms apart.
    assert keep * total - predicted < 1.0
    assert len(selection.layers) < 4


def test_the_search_is_optimal_on_a_small_case():
    model = tiny_model("bert", num_hidden_layers=2, num_attention_heads=2, hidden_size=8, intermediate_size=6)
    table = synthetic_table(model, rest=3.0, empty=1.5, per_head=1.0, per_neuron=0.3, slow=lambda w: 0.7 * (w == 5))
    head_scores, ffn_scores = _scores(num_layers=2, heads=2, ffn=6, seed=3)
    total = table.model_latency([2, 2], [6, 6])
    for keep in (0.9, 0.7, 0.55, 0.45, 0.35):
        config = PruningConfig(target="latency", keep=keep, round_to=1)
        selection = select_units(head_scores, ffn_scores, config, table.unit_costs(), latency_table=table)
        # Brute force: every shape of both layers (a layer with nothing left is removed; one must stay).
        best = -1.0
        shapes = [(h, w) for h in range(3) for w in range(7)]
        for (h0, w0), (h1, w1) in itertools.product(shapes, shapes):
            kept = [(h, w) for h, w in ((h0, w0), (h1, w1)) if h or w]
            cost = table.rest_ms + (sum(table.layer_latency(h, w) for h, w in kept) if kept else table.empty_layer_ms)
            if cost <= keep * total * (1 - 2 / BINS):
                value = sum(
                    float(head_scores[i].sort(descending=True).values[:h].sum())
                    + float(ffn_scores[i].sort(descending=True).values[:w].sum())
                    for i, (h, w) in enumerate(((h0, w0), (h1, w1)))
                )
                best = max(best, value)
        assert _predicted(table, selection, 2) <= keep * total + 1e-9
        assert _value(selection, head_scores, ffn_scores) >= best - 1e-5  # float32 sums


@pytest.mark.parametrize(("per_head", "per_neuron", "cheap"), [(20.0, 0.01, "ffn"), (0.05, 0.5, "heads")])
def test_the_search_keeps_what_is_cheap_per_importance(per_head, per_neuron, cheap):
    model = tiny_model("bert", intermediate_size=48)
    table = synthetic_table(model, per_head=per_head, per_neuron=per_neuron)
    head_scores = [torch.ones(4) for _ in range(4)]
    ffn_scores = [torch.full((48,), 4 / 48) for _ in range(4)]  # a layer's heads and neurons are worth as much
    selection = select_units(
        head_scores,
        ffn_scores,
        PruningConfig(target="latency", keep=0.6, round_to=1),
        table.unit_costs(),
        latency_table=table,
    )
    kept_heads = sum(map(len, selection.heads)) / 16
    kept_ffn = sum(map(len, selection.ffn)) / (4 * 48)
    assert (kept_ffn > kept_heads) if cheap == "ffn" else (kept_heads > kept_ffn)


def test_an_emptied_layer_is_removed_and_its_whole_time_saved():
    model = tiny_model("bert", intermediate_size=48)
    table = synthetic_table(model, empty=6.0)
    head_scores, ffn_scores = _scores()
    head_scores[2], ffn_scores[2] = head_scores[2] * 1e-3, ffn_scores[2] * 1e-3  # a layer that hardly matters
    config = PruningConfig(target="latency", keep=0.7, round_to=1)
    selection = select_units(head_scores, ffn_scores, config, table.unit_costs(), latency_table=table)
    assert selection.layers == [2] and selection.heads[2] == [] and selection.ffn[2] == []
    # The gradual callback keeps empty layers: the same budget then leaves layer 2 empty but in place.
    kept = select_units(
        head_scores, ffn_scores, config, table.unit_costs(), latency_table=table, drop_empty_layers=False
    )
    assert kept.layers == []
    total = table.model_latency([4] * 4, [48] * 4)
    assert table.model_latency(*[[len(x) for x in kind] for kind in (kept.heads, kept.ffn)]) <= 0.7 * total


def test_widths_are_rounded_to_what_the_table_measured_as_fast():
    model = tiny_model("bert", intermediate_size=48)
    # Widths that are not multiples of 8 run 2 ms slower: never worth it, even with round_to=1.
    table = synthetic_table(model, slow=lambda w: 2.0 if w % 8 else 0.0)
    for keep in (0.9, 0.75, 0.6, 0.45):
        selection = select_units(
            *_scores(seed=1),
            PruningConfig(target="latency", keep=keep, round_to=1),
            table.unit_costs(),
            latency_table=table,
        )
        assert all(len(kept) % 8 == 0 for kept in selection.ffn), [len(kept) for kept in selection.ffn]
    # round_to still bounds the choice: multiples of 16 (or the full width).
    selection = select_units(
        *_scores(seed=1),
        PruningConfig(target="latency", keep=0.6, round_to=16),
        table.unit_costs(),
        latency_table=table,
    )
    assert all(len(kept) % 16 == 0 for kept in selection.ffn)


def test_uniform_keeps_every_head_and_one_width():
    model = tiny_model("bert", intermediate_size=48)
    table = synthetic_table(model)
    config = PruningConfig(target="latency", keep=0.85, uniform=True, round_to=8)
    selection = select_units(*_scores(), config, table.unit_costs(), latency_table=table)
    assert [len(h) for h in selection.heads] == [4] * 4 and len({len(f) for f in selection.ffn}) == 1
    assert len(selection.ffn[0]) % 8 == 0
    assert _predicted(table, selection, 4) <= 0.85 * table.model_latency([4] * 4, [48] * 4)


def test_a_budget_below_the_fastest_reachable_is_refused_naming_it(monkeypatch):
    model = tiny_model("bert", intermediate_size=48)
    table = synthetic_table(model)  # 10 ms outside the layers, 2 ms for an empty one, of 10 + 4 * 8.4 = 43.6 ms
    assert minimum_latency(table, [4] * 4, [48] * 4) == pytest.approx(12.0)
    with pytest.raises(ValueError, match=r"fastest this model can get is 12.00 ms.*Use keep >= 0.2752"):
        select_units(*_scores(), PruningConfig(target="latency", keep=0.25), table.unit_costs(), latency_table=table)
    with pytest.raises(ValueError, match="needs the model's latency table"):
        select_units(*_scores(), PruningConfig(target="latency", keep=0.5), table.unit_costs())
    # Through `prune`: refused before any scoring, the model untouched.
    monkeypatch.setattr(latency_table_module, "measure_latency_table", lambda model, *a, **k: synthetic_table(model))
    monkeypatch.setattr("hf_compress.pruning.pruner.compute_importance", lambda *a, **k: pytest.fail("scored"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Use keep >= 0.2752"):
        prune(model, PruningConfig(target="latency", keep=0.2, latency_threads=2), [random_batch()])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": 0}, r"keep=0 must be in \(0, 1\]"),
        ({"keep": 1.5}, r"keep=1.5 must be in \(0, 1\].*0.333 for a 3x speed-up"),
        ({"scope": "layer"}, "target='latency' with scope='layer' is not supported"),
        ({"latency_batch_size": 0}, "latency_batch_size=0 must be a positive integer"),
        ({"latency_threads": 0}, "latency_threads=0 must be a positive integer"),
        ({"latency_table": ""}, "must be the path of a latency table JSON file"),
    ],
)
def test_config_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**{"target": "latency", "keep": 0.5, **kwargs})


def test_the_cli_flags_build_a_latency_config():
    args = build_parser().parse_args(
        "prune --model m --dataset d --output-dir o --target latency --keep 0.333 --latency-batch-size 8 "
        "--latency-threads 2 --latency-table t.json".split()
    )
    config = PruningConfig(**{f.name: getattr(args, f.name) for f in fields(PruningConfig)})
    assert config == PruningConfig(
        target="latency", keep=0.333, latency_batch_size=8, latency_threads=2, latency_table="t.json"
    )


#### Through prune and the callback


def test_prune_to_a_latency_budget(tmp_path, monkeypatch):
    model = tiny_model("bert", intermediate_size=48)
    monkeypatch.setattr(
        latency_table_module, "measure_latency_table", lambda model, *a, **k: synthetic_table(model, empty=6.0)
    )
    path = tmp_path / "latency_table.json"
    config = PruningConfig(target="latency", keep=0.5, latency_threads=2, latency_table=str(path), round_to=1)
    batches = [random_batch(batch_size=8, seq_len=12, seed=i) for i in range(3)]
    report = prune(model, config, batches, show_progress=False)
    latency = report.latency
    assert set(latency) == {"before_ms", "after_ms", "budget_ms", "predicted_speedup", "table", "table_path"}
    assert latency["after_ms"] <= latency["budget_ms"] == pytest.approx(0.5 * latency["before_ms"])
    assert latency["predicted_speedup"] >= 2 and latency["table"]["threads"] == 2
    structure = get_structure(model)
    assert latency["after_ms"] == pytest.approx(report.latency_table.model_latency(structure.heads, structure.ffn))
    assert path.is_file() and json.loads(json.dumps(report.to_dict()))["latency"] == latency
    assert "predicted latency" in report.summary()
    assert torch.isfinite(model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits).all()


def test_prune_measures_a_real_table_of_a_tiny_model(tmp_path):
    model = tiny_model("distilbert")
    path = tmp_path / "latency_table.json"
    table = measure_latency_table(model, batch_size=2, seq_len=8, threads=1, repeats=1, warmup=0, show_progress=False)
    table.save(path)
    # Halfway between the fastest reachable model and the full one: a budget this table can always meet.
    fastest = minimum_latency(table, [4] * 4, [24] * 4) / table.model_latency([4] * 4, [24] * 4)
    config = PruningConfig(
        target="latency",
        keep=(1 + fastest) / 2,
        latency_batch_size=2,
        seq_len=8,
        latency_threads=1,
        latency_table=str(path),
        importance="magnitude",
    )
    report = prune(model, config, [random_batch(batch_size=4, seq_len=8)], show_progress=False)
    assert report.latency["after_ms"] <= report.latency["budget_ms"]
    assert report.latency_table == table and report.latency["table"]["model_type"] == "distilbert"


def _dataset(size: int = 32, seq_len: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 99, (size, seq_len), generator=generator)
    return [
        {"input_ids": ids, "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": int(ids[1] % 2)}
        for ids in input_ids
    ]


def _args(tmp_path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=16,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )


def test_the_callback_prunes_to_a_latency_budget(tmp_path, monkeypatch):
    measured = []

    def measure(model, *args, **kwargs):
        measured.append(args)
        return synthetic_table(model, empty=1.0)

    monkeypatch.setattr(latency_table_module, "measure_latency_table", measure)
    model = tiny_model("bert", intermediate_size=48).train()
    config = PruningConfig(target="latency", keep=0.5, latency_threads=2, round_to=8)
    callback = GradualStructuredPruningCallback(config, begin_step=2, end_step=10, frequency=4)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[callback])
    trainer.train()
    assert len(measured) == 1 and (tmp_path / "latency_table.json").is_file()
    assert [step for step, _ in callback.history] == [6, 10]
    costs = [cost for _, cost in callback.history]
    assert costs[0] > costs[1] and costs[1] <= 0.5 * callback.reference_cost + 1e-9
    assert callback.reference_cost == pytest.approx(callback.latency_table.model_latency([4] * 4, [48] * 4))
    assert get_structure(trainer.model).num_layers == 4  # emptied layers stay while training

    # A second run in the same folder reuses the run's table instead of measuring again.
    again = GradualStructuredPruningCallback(config, begin_step=2, end_step=10, frequency=4)
    fresh = tiny_model("bert", intermediate_size=48).train()
    Trainer(model=fresh, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[again]).train()
    assert len(measured) == 1 and again.latency_table == callback.latency_table


def test_the_callback_refuses_a_mismatched_table_before_training(tmp_path):
    model = tiny_model("bert", intermediate_size=48).train()
    path = tmp_path / "other.json"
    synthetic_table(model, threads=8).save(path)
    config = PruningConfig(target="latency", keep=0.5, latency_threads=2, latency_table=str(path))
    callback = GradualStructuredPruningCallback(config, begin_step=2, end_step=10, frequency=4)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[callback])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"threads 8 \(this run: 2\)"):
        trainer.train()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
