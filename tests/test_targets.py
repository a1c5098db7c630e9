"""Target prompts: a learned token per structure name joins the click and box tokens (msa.modeling.targets).

What would break them: a token that never reaches the decoder (named = unnamed), rows mixed up inside a
batch, names spelled differently at training and at inference, a model with target prompts that answers
unnamed prompts differently, an adapter file that loses them, a targets-only run that moves anything else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import synthetic_pair, volume_of, write_pair

import msa
import msa.cli
from msa.checkpoint import read_checkpoint, save_adapters
from msa.engine import Engine
from msa.errors import CheckpointError, MSAError, PromptError
from msa.modeling.targets import TargetPrompts, canonical_name
from msa.session import Session
from msa.store import FeatureStore
from msa.trainers import TrainConfig
from msa.trainers.finetune import helpful_targets, train_on
from msa.trainers.slices import SliceData


def tiny(names=("liver", "Left-Hippocampus", "brain")) -> msa.MSA:
    torch.manual_seed(0)
    model = msa.build_model("lite_medsam_tiny", pretrained=False)
    if names:
        model.set_targets(list(names))
    return model.eval()


def decode(model: msa.MSA, embeddings: torch.Tensor, targets=None):
    points = (torch.tensor([[[100.0, 120.0]]]).expand(len(embeddings), -1, -1), torch.ones(len(embeddings), 1))
    with torch.no_grad():
        return model.decode(embeddings, points, None, None, targets=targets)[0]


def test_canonical_names_and_unknown_names():
    model = tiny()
    assert model.targets == ("brain", "left_hippocampus", "liver")
    assert canonical_name("Inferior vena cava") == "inferior_vena_cava"
    assert model.target_row("Left-Hippocampus") == model.target_row("left hippocampus") == 1
    with pytest.raises(PromptError, match="unknown target 'spleen'.*brain, left_hippocampus, liver"):
        model.target_row("spleen")
    with pytest.raises(PromptError, match="learnt no target names"):
        tiny(names=()).target_row("liver")
    # Untrained tokens start near SAM's "not a point" token (which the decoder reads as no information).
    offsets = model.target_prompts.embeddings.detach() - model.prompt_encoder.not_a_point_embed.weight[0]
    assert 0.05 < float(offsets.std()) < 0.2


def test_a_named_prompt_reaches_the_decoder_row_by_row():
    """Each name changes the answer, differently; a batch of named prompts answers as each alone; the
    unnamed answer is the same with or without target prompts in the model."""
    model, bare = tiny(), tiny(names=())
    embeddings = torch.randn(3, model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size)
    unnamed = decode(model, embeddings)
    torch.testing.assert_close(unnamed, decode(bare, embeddings), rtol=0, atol=0)
    rows = torch.tensor([0, 1, 2])
    batched = decode(model, embeddings, rows)
    for b in range(3):
        alone = decode(model, embeddings[b:b + 1], rows[b:b + 1])
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-5, atol=1e-5)
        assert (alone - unnamed[b:b + 1]).abs().max() > 1e-3
    assert (decode(model, embeddings[:1], rows[:1]) - decode(model, embeddings[:1], rows[1:2])).abs().max() > 1e-3


def test_set_targets_keeps_the_tokens_of_names_kept():
    model = tiny(names=("liver", "brain"))
    with torch.no_grad():
        model.target_prompts.embeddings.add_(1.0)  # as if trained
    liver = model.target_prompts.embeddings[model.target_row("liver")].clone()
    model.set_targets(["liver", "spleen"])
    assert model.targets == ("liver", "spleen")
    torch.testing.assert_close(model.target_prompts.embeddings[model.target_row("liver")], liver)
    assert model.target_prompts.embeddings.requires_grad and model.is_trainable("target_prompts.embeddings")


def test_adapter_files_keep_their_target_prompts(tmp_path: Path):
    model = tiny()
    with torch.no_grad():
        model.target_prompts.embeddings.normal_()
    save_adapters(model, tmp_path / "named.pt")
    save_adapters(tiny(names=()), tmp_path / "plain.pt")
    assert read_checkpoint(tmp_path / "named.pt")["metadata"]["targets"] == ["brain", "left_hippocampus", "liver"]

    loaded = tiny(names=())
    msa.load_adapters(loaded, tmp_path / "named.pt")
    assert loaded.targets == model.targets
    torch.testing.assert_close(loaded.target_prompts.embeddings, model.target_prompts.embeddings, rtol=0, atol=0)
    msa.load_adapters(loaded, tmp_path / "plain.pt")  # a file without names takes them away
    assert loaded.targets == ()

    payload = read_checkpoint(tmp_path / "named.pt")
    payload["metadata"]["targets"] = ["brain", "liver"]  # lists 2 names for 3 tokens
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="target prompts do not match the 2 names"):
        msa.load_adapters(tiny(names=()), tmp_path / "broken.pt")
    payload["metadata"]["targets"] = ["liver", "brain", "left_hippocampus"]  # rows in another order than sorted
    torch.save(payload, tmp_path / "unsorted.pt")
    with pytest.raises(CheckpointError, match="target prompts do not match the 3 names"):
        msa.load_adapters(tiny(names=()), tmp_path / "unsorted.pt")

    # A damaged tensor is refused before the model changes: its names and tokens stay as they were.
    payload = read_checkpoint(tmp_path / "plain.pt")
    key = next(k for k, v in payload["state_dict"].items() if "_adapter." in k and v.shape[0] > 1)
    payload["state_dict"][key] = payload["state_dict"][key][:1]
    torch.save(payload, tmp_path / "damaged.pt")
    kept = tiny(names=("brain",))
    with pytest.raises(CheckpointError, match=f"{key} is"):
        msa.load_adapters(kept, tmp_path / "damaged.pt")
    assert kept.targets == ("brain",)


def test_engine_and_session_send_the_name(monkeypatch):
    """Engine.predict(target=...) sends the name with every decode (the refinement round included) and
    answers differently from the unnamed prompt; Session.set_target names every prompt of its label,
    propagated slices included; unknown names are refused."""
    model = tiny(names=("blob",))
    engine = Engine(model)
    sent = []
    decode = model.decode

    def recording(*args, targets=None, **kwargs):
        sent.append(None if targets is None else targets.tolist())
        return decode(*args, targets=targets, **kwargs)

    monkeypatch.setattr(model, "decode", recording)
    voxels, labels = synthetic_pair()
    volume = volume_of(voxels)
    named, _ = engine.predict(volume, 1, points=[(14.0, 16.0, 1)], target="blob")
    assert sent == [[0], [0]]  # the click, then its refinement with the mask's box
    unnamed, _ = engine.predict(volume, 1, points=[(14.0, 16.0, 1)])
    assert np.abs(named - unnamed).max() > 1e-3
    with pytest.raises(PromptError, match="unknown target 'liver'"):
        engine.predict(volume, 1, points=[(14.0, 16.0, 1)], target="liver")

    session = Session(engine, volume)
    session.add_point((14, 16, 1), propagate=False)
    np.testing.assert_array_equal(session.tracks[1].masks[1], unnamed > 0)
    session.set_target("Blob", propagate=False)  # re-segments the prompts already given
    np.testing.assert_array_equal(session.tracks[1].masks[1], named > 0)
    sent.clear()
    session.add_roi([6, 21, 8, 23, 0, 3])  # propagated through the other slices, still named
    assert len(sent) >= 4 and all(rows == [0] for rows in sent), sent
    with pytest.raises(PromptError, match="unknown target"):
        session.set_target("liver")


def test_targets_only_training_moves_the_tokens_alone(tmp_path: Path):
    """targets_only: every tensor but the target tokens stays bit-identical, so unnamed prompts answer as
    before; the tokens of the data's structure names learn; validation reports the named click."""
    torch.manual_seed(0)
    engine = Engine(msa.build_model("lite_medsam_tiny", pretrained=False), store=FeatureStore(tmp_path / "features"))
    model = engine.model
    voxels, labels = synthetic_pair()
    data = SliceData(engine, [(volume_of(voxels), labels)], None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(steps=3, batch_size=4, eval_every=3, target_probability=1.0, targets_only=True)
    stats = train_on(engine, data, None, tmp_path / "t.pt", config, resume=False)
    assert model.targets == ("1", "2")  # the structures' names in a source without label names
    changed = {k for k, v in model.state_dict().items() if k not in before or not torch.equal(before[k], v)}
    assert changed == {"target_prompts.embeddings"}
    start = TargetPrompts(["1", "2"], model.prompt_encoder.not_a_point_embed.weight[0]).embeddings.detach()
    assert not torch.allclose(model.target_prompts.embeddings.detach(), start)
    record = stats["history"][-1]
    assert "dice_click1_named" in record
    saved = read_checkpoint(tmp_path / "t.pt")
    assert saved["metadata"].get("targets", []) == helpful_targets(record, model.targets)


def test_a_file_keeps_only_the_names_that_validated_better_than_a_plain_click(tmp_path: Path):
    record = {"per_source": {
        "ct": {"structures": {"liver": {"click1": 0.80, "click1_named": 0.90},
                              "spleen": {"click1": 0.90, "click1_named": 0.85}}},
        "mr": {"structures": {"liver": {"click1": 0.85, "click1_named": 0.80},  # liver: +0.10 and -0.05
                              "Left-Hippocampus": {"click1": 0.30, "click1_named": 0.30}}}}}
    names = ("brain", "left_hippocampus", "liver", "spleen")  # brain: never validated
    assert helpful_targets(record, names) == ["left_hippocampus", "liver"]

    model = tiny(names=names)
    save_adapters(model, tmp_path / "kept.pt", targets=["spleen", "liver"])
    loaded = tiny(names=())
    msa.load_adapters(loaded, tmp_path / "kept.pt")
    assert loaded.targets == ("liver", "spleen")
    for name in ("liver", "spleen"):
        torch.testing.assert_close(loaded.target_prompts.embeddings[loaded.target_row(name)],
                                   model.target_prompts.embeddings[model.target_row(name)], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not the model's"):
        save_adapters(model, tmp_path / "bad.pt", targets=["aorta"])


def test_target_options_are_checked(tmp_path: Path, capsys):
    data = write_pair(tmp_path)
    common = ["--backbone", "lite_medsam_tiny", "--steps", "2", "--eval-every", "2"]
    for bad in (["--targets-only"], ["--target-probability", "1.5"],
                ["--target-probability", "1", "--targets-only", "--encoder-blocks", "1"]):
        assert msa.cli.main(["train", data, "--out", str(tmp_path / "a.pt"), *common, *bad]) == 2, bad
    assert not (tmp_path / "a.pt").exists()
    image = data.split(":")[0]
    assert msa.cli.main(["segment", image, "-o", str(tmp_path / "m.nii.gz"), "--point", "14,16,1",
                         "--text", "liver", "--backbone", "lite_medsam_tiny", "--no-adapters"]) == 2
    assert "learnt no target names" in capsys.readouterr().err
    assert msa.cli.main(["eval", data, "--prompt", "click1", "--named", "--backbone", "lite_medsam_tiny",
                         "--no-adapters"]) == 2
    assert "named prompts need adapters with target prompts" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()
    with pytest.raises(MSAError):
        TrainConfig(target_probability=-0.1)


def test_eval_names_the_structures_whose_names_the_adapters_know(tmp_path: Path):
    """msa eval --named: structure "1" (a name the model learnt) is prompted with its name, structure "2"
    with the plain click, so its scores are the plain run's."""
    from msa.data import parse_source
    from msa.evaluate import evaluate

    engine = Engine(tiny(names=("1",)))
    source = parse_source(write_pair(tmp_path))
    plain = evaluate(engine, source, "click1")
    named = evaluate(engine, source, "click1", named=True)
    assert plain["named"] == [] and named["named"] == ["1"]
    assert named["per_label"]["2"] == plain["per_label"]["2"]
    assert named["per_label"]["1"] != plain["per_label"]["1"]  # the name reached the decoder


def test_params_lists_a_files_target_names(tmp_path: Path, capsys):
    save_adapters(tiny(), tmp_path / "named.pt")
    assert msa.cli.main(["params", "--checkpoint", str(tmp_path / "named.pt")]) == 0
    assert "target names (--text): brain, left_hippocampus, liver" in capsys.readouterr().out


def test_a_run_that_names_nothing_keeps_the_names_it_started_with(tmp_path: Path):
    """The server's active-learning training names no structures (its labels have no names): the adapters it
    publishes keep the served target prompts, tokens unchanged, rather than losing them."""
    torch.manual_seed(0)
    engine = Engine(msa.build_model("lite_medsam_tiny", pretrained=False), store=FeatureStore(tmp_path / "features"))
    engine.model.set_targets(["liver", "brain"])
    tokens = engine.model.target_prompts.embeddings.detach().clone()
    voxels, labels = synthetic_pair()
    data = SliceData(engine, [(volume_of(voxels), labels)], None)
    train_on(engine, data, None, tmp_path / "plain.pt", TrainConfig(steps=2, batch_size=2, eval_every=2), resume=False)
    saved = read_checkpoint(tmp_path / "plain.pt")
    assert saved["metadata"]["targets"] == ["brain", "liver"]
    torch.testing.assert_close(saved["state_dict"]["target_prompts.embeddings"], tokens, rtol=0, atol=0)
