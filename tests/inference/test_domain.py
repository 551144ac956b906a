"""Model domains: rule matching (synonyms, missing facts, every field), cards and configuration."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from medpipe.config import Config, ModelConfig
from medpipe.errors import ConfigError, ModelError
from medpipe.inference.domain import Domain, Facts, match, regions
from medpipe.inference.model import configured_name, resolve_model, select_model

CHEST_CT = Facts("CT", body_part="CHEST", orientation="axial", n_slices=48, field_of_view_mm=(256.0, 256.0),
                 photometric="MONOCHROME2", series_description="CHEST 2.5MM")


@pytest.mark.parametrize("value", ["CHEST", "THORAX", "Lung", "lungs", " chest ", "CHEST_ABDOMEN", "CHESTABDPELVIS",
                                   "WHOLEBODY"])
def test_chest_synonyms_and_combined_regions_match(value):
    assert match(Domain(body_parts=["CHEST"]), Facts("CT", body_part=value))[0]


@pytest.mark.parametrize("value", ["HEAD", "BRAIN", "SKULL", "HEADNECK"])
def test_head_synonyms_match_head_not_chest(value):
    assert match(Domain(body_parts=["HEAD"]), Facts("CT", body_part=value))[0]
    ok, why = match(Domain(body_parts=["CHEST"]), Facts("CT", body_part=value))
    assert not ok and why == f"body part {value}, the model needs CHEST"


def test_domain_synonyms_accept_site_terms_and_regions_name_unknown_terms():
    assert not match(Domain(body_parts=["CHEST"]), Facts("CT", body_part="TORSO-UP"))[0]
    assert match(Domain(body_parts=["CHEST"], synonyms=["torso up"]), Facts("CT", body_part="TORSO-UP"))[0]
    assert regions("foo") == {"FOO"} and regions("Brain") == {"HEAD"}


@pytest.mark.parametrize("rule, facts, reason", [
    ({"modalities": ["CT"]}, {"modality": "US"}, "modality US is not covered (covers CT)"),
    ({"orientation": "axial"}, {"orientation": "coronal"}, "coronal slices, the model needs axial"),
    ({"min_slices": 16}, {"n_slices": 15}, "15 slice(s), fewer than 16"),
    ({"field_of_view_mm": [128, 600]}, {"field_of_view_mm": (85.0, 300.0)},
     "field of view 85 x 300 mm, the model needs 128-600 mm"),
    ({"field_of_view_mm": [128, 600]}, {"field_of_view_mm": (700.0, 700.0)},
     "field of view 700 x 700 mm, the model needs 128-600 mm"),
    ({"photometric": ["MONOCHROME2"]}, {"photometric": "RGB"},
     "photometric interpretation RGB, the model needs MONOCHROME2"),
    ({"series_description": "chest|thorax"}, {"series_description": "HEAD 5MM"},
     "series description does not match /chest|thorax/"),
])
def test_every_rule_field_excludes_with_its_reason(rule, facts, reason):
    domain = Domain(**rule)
    assert match(domain, CHEST_CT)[0]  # the chest CT is inside every one of these rules
    broken = Facts(**{**CHEST_CT.__dict__, **facts})
    assert match(domain, broken) == (False, reason)


def test_min_slices_and_fov_bounds_are_inclusive_and_description_is_case_insensitive():
    domain = Domain(min_slices=48, field_of_view_mm=(256, 256), series_description="^chest")
    assert match(domain, CHEST_CT)[0]


@pytest.mark.parametrize("rule, missing, reason", [
    ({"body_parts": ["CHEST"]}, "body_part", "no BodyPartExamined (body part unknown, the model needs CHEST)"),
    ({"orientation": "axial"}, "orientation",
     "no ImageOrientationPatient (orientation unknown, the model needs axial)"),
    ({"field_of_view_mm": [128, 600]}, "field_of_view_mm",
     "no pixel spacing (field of view unknown, the model needs 128-600 mm)"),
    ({"photometric": ["MONOCHROME2"]}, "photometric",
     "no PhotometricInterpretation (photometric unknown, the model needs MONOCHROME2)"),
    ({"series_description": "chest"}, "series_description",
     "no series description (series description unknown, the model needs /chest/)"),
])
def test_missing_facts_exclude_unless_allowed(rule, missing, reason):
    facts = Facts(**{**CHEST_CT.__dict__, missing: None})
    assert match(Domain(**rule), facts) == (False, reason)
    fact = "field_of_view" if missing == "field_of_view_mm" else missing
    assert match(Domain(**rule, allow_unknown=[fact]), facts)[0]
    assert match(Domain(), facts)[0]  # a rule left at "any" needs no fact


def test_all_broken_rules_are_listed_and_matches_say_what_matched():
    d = Domain(modalities=["CT"], body_parts=["CHEST"], orientation="axial", min_slices=16)
    ok, why = match(d, Facts("US", photometric="RGB", n_slices=1))
    assert not ok and why.split("; ") == [
        "modality US is not covered (covers CT)", "no BodyPartExamined (body part unknown, the model needs CHEST)",
        "no ImageOrientationPatient (orientation unknown, the model needs axial)", "1 slice(s), fewer than 16"]
    assert match(d, CHEST_CT) == (True, "CT, body part CHEST, axial, 48 slices")


@pytest.mark.parametrize("bad", [{"orientation": "upside"}, {"min_slices": 0}, {"field_of_view_mm": [300, 100]},
                                 {"photometric": ["GREEN"]}, {"series_description": "(unclosed"},
                                 {"allow_unknown": ["modality"]}, {"bodypart": ["CHEST"]}])
def test_invalid_domains_are_refused(bad):
    with pytest.raises(ValidationError):
        Domain(**bad)
    with pytest.raises(ConfigError, match="invalid"):
        Config.load(None, {"model": {"domain": bad}})


def test_facts_round_trip_through_json():
    assert Facts.from_dict(json.loads(json.dumps(CHEST_CT.to_dict()))) == CHEST_CT


# ------------------------------------------------------------------ configuration and cards

def test_default_card_declares_chest_ct():
    info = resolve_model(ModelConfig())
    d = info.applies_to()
    assert d.modalities == ["CT"] and d.body_parts == ["CHEST"] and d.orientation == "axial"
    assert d.min_slices == 16 and d.photometric == ["MONOCHROME2"]
    assert info.to_dict()["domain"]["body_parts"] == ["CHEST"]


def test_configured_domain_overrides_card_keys_and_legacy_modalities_still_count():
    info = resolve_model(ModelConfig(domain={"body_parts": ["HEAD"], "min_slices": 1}))
    d = info.applies_to()
    assert d.body_parts == ["HEAD"] and d.min_slices == 1 and d.orientation == "axial"  # the card's, kept
    assert resolve_model(ModelConfig(modalities=["MR"])).applies_to().modalities == ["MR"]
    assert resolve_model(ModelConfig(modalities=["MR"], domain={"modalities": ["PT"]})).modalities == ("PT",)


def test_model_without_card_domain_covers_its_modalities_only(tiny_model):
    d = resolve_model(ModelConfig(path=tiny_model, input_size=32)).applies_to()
    assert d.modalities == ["CT"] and d.body_parts == [] and d.min_slices == 1


def test_bad_card_domain_is_a_model_error(tmp_path, tiny_model):
    (tmp_path / "model.keras").write_bytes(tiny_model.read_bytes())
    (tmp_path / "model_card.json").write_text(json.dumps({"file": "model.keras", "domain": {"orientation": "up"}}))
    with pytest.raises(ModelError, match="invalid domain in the model card"):
        resolve_model(ModelConfig(path=tmp_path / "model.keras"))


def test_several_models_validated_at_load(tmp_path, tiny_model):
    cfg_file = tmp_path / "medpipe.yaml"
    cfg_file.write_text(f"""
models:
  - name: chest
    domain: {{body_parts: [CHEST], min_slices: 16}}
  - name: any-ct
    path: {tiny_model}
    input_size: 32
    domain: {{modalities: [CT], allow_unknown: [body_part]}}
""")
    cfg = Config.load(cfg_file)
    assert [configured_name(m) for m in cfg.inference_models()] == ["chest", "any-ct"]
    assert select_model(cfg, "any-ct").path == tiny_model and select_model(cfg).name == "chest"
    assert Config.model_validate(cfg.model_dump(mode="json")) == cfg  # what travels to tasks validates again
    with pytest.raises(ModelError, match="no configured model is called 'nope'"):
        select_model(cfg, "nope")
    with pytest.raises(ConfigError, match="names must be unique; a given more than once"):
        Config.load(None, {"models": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match=r"models\[1\]: every entry of `models` needs a name"):
        Config.load(None, {"models": [{"name": "a"}, {"path": str(tiny_model)}]})
    with pytest.raises(ConfigError, match="either `model`"):
        Config.load(None, {"model": {"batch_size": 4}, "models": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="model b: invalid domain: orientation"):
        Config.load(None, {"models": [{"name": "b", "domain": {"orientation": "diagonal"}}]})


def test_single_model_section_keeps_working():
    cfg = Config.load(None, {"model": {"batch_size": 8}})
    (only,) = cfg.inference_models()
    assert only is cfg.model and configured_name(only) == "medpipe-lesion-slice-cnn"
    assert select_model(cfg, "medpipe-lesion-slice-cnn") is cfg.model
