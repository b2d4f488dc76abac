"""Every model of the reference's manifest (the study's models) is registered, with a state_dict equal to the
reference's key for key (checkpoint compatibility). Other registered models (a new mixer) are not checked here."""

import json
from pathlib import Path

import pytest
import timm
import torch

import stm_backbones

MANIFEST_PATH = Path(__file__).resolve().parents[3] / "tests" / "data" / "state_dict_manifest.json"

MODEL_NAMES = sorted(json.loads(MANIFEST_PATH.read_text()))


def test_every_manifest_model_is_registered():
    missing = sorted(set(MODEL_NAMES) - set(stm_backbones.list_models()))
    assert not missing, f"models of the manifest not registered: {missing}"


def test_study_mixers_are_the_manifest_models():
    """The study's mixer families register exactly the manifest's models of those families (no size missing,
    none without a reference)."""
    study = {m for f in stm_backbones.list_families(study=True) for m in f.models()}
    assert study and study <= set(MODEL_NAMES)
    for family in stm_backbones.list_families(study=True):
        in_manifest = {n for n in MODEL_NAMES if (found := stm_backbones.family_of(n)) and found[0] is family}
        assert in_manifest == set(family.models()), family.name


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_matches_reference(name, manifest):
    expected = manifest[name]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = timm.create_model(name)
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    theirs = [tuple(entry) for entry in expected["state_dict"]]
    ours_by_key = {k: (s, d) for k, s, d in ours}
    theirs_by_key = {k: (s, d) for k, s, d in theirs}
    assert sorted(ours_by_key) == sorted(theirs_by_key), (
        f"missing: {sorted(set(theirs_by_key) - set(ours_by_key))[:10]}, "
        f"extra: {sorted(set(ours_by_key) - set(theirs_by_key))[:10]}")
    for key, (shape, dtype) in theirs_by_key.items():
        assert ours_by_key[key] == (shape, dtype), key
    assert sum(p.numel() for p in model.parameters()) == expected["params"]
