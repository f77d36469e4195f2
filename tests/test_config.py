"""GPTQConfig parsing, validation and the two-source consistency check."""

import json

import pytest

from zephyr_plugins import CheckpointError, GPTQConfig

THEBLOKE = {
    "bits": 4,
    "group_size": 32,
    "damp_percent": 0.1,
    "desc_act": True,
    "static_groups": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
    "quant_method": "gptq",
}


def test_round_trip_keeps_unknown_keys():
    cfg = GPTQConfig.from_dict(THEBLOKE)
    assert cfg.bits == 4 and cfg.group_size == 32 and cfg.desc_act
    assert cfg.extra == {"model_name_or_path": None, "model_file_base_name": "model"}
    again = cfg.to_dict()
    for key, value in THEBLOKE.items():
        assert again[key] == value


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("bits", 5, r"bits=5 is not supported; allowed values: \[2, 3, 4, 8\]"),
        ("group_size", 0, r"group_size=0 is invalid; allowed values: -1 or a positive integer"),
        ("group_size", -2, r"group_size=-2 is invalid"),
        ("checkpoint_format", "marlin", r"checkpoint_format='marlin' is not supported"),
        ("damp_percent", 0.0, r"damp_percent=0.0 is out of range"),
        ("desc_act", "yes", r"desc_act='yes' must be of type bool"),
    ],
)
def test_validation_names_field_value_and_allowed(field, value, match):
    with pytest.raises(ValueError, match=match):
        GPTQConfig(**{field: value})


def test_groups_and_partial_last_group():
    cfg = GPTQConfig(bits=4, group_size=128)
    assert cfg.num_groups(576) == 5  # SmolLM2's 576 inputs: the last group holds 64 rows
    assert cfg.num_groups(4096) == 32
    assert GPTQConfig(bits=8, group_size=-1).num_groups(14336) == 1
    assert cfg.zero_offset == 1 and GPTQConfig(checkpoint_format="gptq_v2").zero_offset == 0


def _write(folder, qc=None, hf_qc=None):
    folder.mkdir(exist_ok=True)
    if qc is not None:
        (folder / "quantize_config.json").write_text(json.dumps(qc))
    cfg = {"model_type": "mistral"}
    if hf_qc is not None:
        cfg["quantization_config"] = hf_qc
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_from_folder_reads_either_source(tmp_path):
    assert GPTQConfig.from_folder(_write(tmp_path / "a", qc=THEBLOKE)).group_size == 32
    assert GPTQConfig.from_folder(_write(tmp_path / "b", hf_qc={**THEBLOKE, "bits": 8})).bits == 8


def test_from_folder_disagreement_raises(tmp_path):
    folder = _write(tmp_path / "c", qc=THEBLOKE, hf_qc={**THEBLOKE, "group_size": 128})
    with pytest.raises(CheckpointError, match=r"disagree \(group_size: 32 vs 128\)"):
        GPTQConfig.from_folder(folder)


def test_from_folder_without_settings(tmp_path):
    with pytest.raises(CheckpointError, match="no GPTQ settings found"):
        GPTQConfig.from_folder(_write(tmp_path / "d"))


def test_bad_json_and_wrong_method(tmp_path):
    folder = tmp_path / "e"
    folder.mkdir()
    (folder / "quantize_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        GPTQConfig.from_folder(folder)
    with pytest.raises(CheckpointError, match="quant_method='awq' is not a GPTQ method"):
        GPTQConfig.from_dict({**THEBLOKE, "quant_method": "awq"})
