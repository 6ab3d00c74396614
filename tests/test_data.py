import json

import pytest

from hf_compress import HubUnreachableError, load_text_classification_dataset, require_hub_or_local
from hf_compress.data import _rewrite_command, detect_text_columns, load_local_splits, read_data_file

TRAIN = [('a "quoted start and no end', 1), ('"fully quoted"', 0), ("it 's fine , really", 1)]
VALIDATION = [("dull", 0), ("great fun", 1)]


def _write_tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{sentence}\t{label}\n" for sentence, label in rows))


def test_glue_style_tsv_keeps_quotes_and_int_labels(tmp_path):
    _write_tsv(tmp_path / "train.tsv", TRAIN)
    _write_tsv(tmp_path / "dev.tsv", VALIDATION)
    data = load_text_classification_dataset(str(tmp_path))
    assert set(data.dataset) == {"train", "validation"}
    # QUOTE_NONE: quote characters are text, and an unbalanced quote does not swallow the following lines.
    assert data.dataset["train"]["sentence"] == [sentence for sentence, _ in TRAIN]
    assert data.dataset["train"]["label"] == [1, 0, 1]
    assert data.text_columns == ("sentence",) and data.label_column == "label"
    assert data.source == {"path": str(tmp_path)}


def test_csv_with_string_labels_and_sentence_pairs(tmp_path):
    (tmp_path / "train.csv").write_text("premise,hypothesis,label\nA man,A person,yes\nA cat,A dog,no\n")
    (tmp_path / "validation.csv").write_text("premise,hypothesis,label\nRain,Wet,yes\n")
    data = load_text_classification_dataset(str(tmp_path))
    assert data.text_columns == ("premise", "hypothesis")
    assert data.label_names == ["no", "yes"] and data.dataset["train"]["label"] == [1, 0]
    mapped = load_text_classification_dataset(str(tmp_path), label2id={"yes": 0, "no": 1})
    assert mapped.dataset["train"]["label"] == [0, 1] and mapped.label_names == ["yes", "no"]
    with pytest.raises(ValueError, match=r"Labels \['no'\] are not in label2id"):
        load_text_classification_dataset(str(tmp_path), label2id={"yes": 0})


def test_jsonl_with_explicit_columns(tmp_path):
    rows = [{"review": "good", "stars": 1}, {"review": "bad", "stars": 0}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    data = load_text_classification_dataset(
        str(tmp_path), text_columns=["review"], label_column="stars", splits=("train",)
    )
    assert data.dataset["train"]["review"] == ["good", "bad"]
    with pytest.raises(ValueError, match="no column 'label'; its columns are \\['review', 'stars'\\]"):
        load_text_classification_dataset(str(tmp_path), text_columns=["review"])
    with pytest.raises(ValueError, match="Cannot tell which column holds the text"):
        load_text_classification_dataset(str(tmp_path), label_column="stars")


def test_clear_errors_for_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="No such folder: ./missing"):
        load_text_classification_dataset("./missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no dataset files.*train/validation.*found \['notes.txt'\]"):
        load_text_classification_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="is a file; pass the folder"):
        load_text_classification_dataset(str(tmp_path / "notes.txt"))
    _write_tsv(tmp_path / "train.tsv", TRAIN)
    (tmp_path / "train.csv").write_text("sentence,label\nx,1\n")
    with pytest.raises(ValueError, match="several files for the train split"):
        load_text_classification_dataset(str(tmp_path))
    (tmp_path / "train.csv").unlink()
    (tmp_path / "validation.tsv").write_text("sentence\tlabel\ntoo\tmany\tfields\n")
    with pytest.raises(ValueError, match="line 2: 3 tab-separated fields"):
        load_text_classification_dataset(str(tmp_path))


def test_offline_hub_id_fails_fast_with_local_command(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    argv = ["examples/distill_bert_sst2.py", "--teacher=textattack/bert-base-uncased-SST-2", "--output_dir", "out"]
    with pytest.raises(HubUnreachableError) as error:
        require_hub_or_local(
            models={"--teacher": "textattack/bert-base-uncased-SST-2"}, datasets={"--dataset": "glue"}, argv=argv
        )
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message and "--teacher textattack/bert-base-uncased-SST-2" in message
    assert (
        "python examples/distill_bert_sst2.py --teacher PATH/TO/MODEL_FOLDER --output_dir out "
        "--dataset PATH/TO/DATA_FOLDER" in message
    )
    # Local paths need no Hub.
    require_hub_or_local(models={"--teacher": str(tmp_path)}, datasets={"--dataset": str(tmp_path)}, argv=argv)


def test_unreachable_hub_is_detected_without_offline_mode(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def refuse(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr("huggingface_hub.utils.get_session", lambda: type("S", (), {"head": refuse})())
    with pytest.raises(HubUnreachableError, match="there is no connection to it"):
        require_hub_or_local(datasets={"--dataset": "glue"}, argv=["run.py"])


def test_rewrite_command_replaces_both_flag_forms():
    argv = ["run.py", "--a", "1", "--teacher", "x/y", "--b=2"]
    assert _rewrite_command(argv, {"--teacher": "T", "--b": "B"}) == "python run.py --a 1 --teacher T --b B"


def test_read_data_file_is_the_one_reader_of_a_file(tmp_path):
    path = tmp_path / "calibration.tsv"
    path.write_text('sentence\tlabel\n"quoted start\t1\n\nplain\t0\n')  # a blank line is skipped
    data = read_data_file(path)
    assert data["sentence"] == ['"quoted start', "plain"] and data["label"] == [1, 0]
    (tmp_path / "rows.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert read_data_file(tmp_path / "rows.jsonl")["text"] == ["a", "b"]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown file type '.txt'; use .tsv, .csv, .json or .jsonl"):
        read_data_file(tmp_path / "notes.txt")
    # A folder's splits are read by the same function.
    path.rename(tmp_path / "train.tsv")
    assert load_local_splits(tmp_path, ("train", "validation"))["train"]["sentence"] == data["sentence"]


def test_detect_text_columns():
    assert detect_text_columns(["label", "sentence"]) == ("sentence",)
    assert detect_text_columns(["premise", "hypothesis", "label"]) == ("premise", "hypothesis")
    assert detect_text_columns(["review", "label"]) is None
