"""TwoSimplicialLM.save_pretrained / from_pretrained: the round trip, every kind of directory it
loads (run, checkpoint, saved), and the refusals (corrupt or incomplete files, wrong paths)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_lm_config
from tokenizers import Tokenizer, models

from twosimplicial import ModelConfig, TwoSimplicialLM
from twosimplicial.checkpoint import CheckpointError, file_sha256
from twosimplicial.train import load_model, run_corpus, train

CONFIGS = {
    "tied-hybrid": dict(vocab_size=97, dim=32, n_layers=2, n_heads=2, simplicial_every=2, w1=8, w2=4,
                        max_seq_len=32),
    "untied-moe-determinant": dict(vocab_size=97, dim=36, n_layers=2, n_heads=2, simplicial_every=1, w1=8, w2=4,
                                   form="determinant", tie_embeddings=False, n_experts=4, moe_top_k=2,
                                   max_seq_len=32, output_size=5),
}


def tokens(cfg: ModelConfig, B=2, S=12, seed=0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x)[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 8-step language-model run (checkpoints at steps 6 and 8)."""
    tmp = tmp_path_factory.mktemp("pretrained")
    train(tiny_lm_config(tmp, "run"))
    return tmp / "run"


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = TwoSimplicialLM(ModelConfig(**CONFIGS["tied-hybrid"]))
    tok = Tokenizer(models.BPE())
    return model, model.save_pretrained(tmp_path / "saved", tokenizer=tok)


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_gives_equal_logits(name, tmp_path):
    torch.manual_seed(1)
    model = TwoSimplicialLM(ModelConfig(**CONFIGS[name]))
    with torch.no_grad():                                   # weights unlike a fresh init's
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = model.save_pretrained(tmp_path / "m")
    assert out == tmp_path / "m"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == model.config.to_dict()
    loaded = TwoSimplicialLM.from_pretrained(out)
    assert loaded.config == model.config and not loaded.training
    assert loaded.pretrained_source == {"kind": "saved", "path": str(out), "step": None}
    x = tokens(model.config)
    assert torch.equal(logits(model.eval(), x), logits(loaded, x))
    assert (loaded.head.weight is loaded.embed.weight) == model.config.tie_embeddings   # the tie survives


def test_save_writes_the_tokenizer_and_drops_a_stale_one(run, tmp_path):
    model, _ = load_model(run)
    tok = run_corpus(run).tokenizer
    out = model.save_pretrained(tmp_path / "m", tokenizer=tok)
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids == tok.encode(text).ids
    assert "tokenizer.json" in json.loads((out / "manifest.json").read_text())["files"]
    model.save_pretrained(out)                                  # saved again without one: the old one goes
    assert not (out / "tokenizer.json").exists()
    assert TwoSimplicialLM.from_pretrained(out).config == model.config


# ----------------------------------------------------------------------------- what it loads
def test_loads_a_run_directory_at_its_latest_checkpoint(run):
    model = TwoSimplicialLM.from_pretrained(run)
    ck = run / "checkpoints" / "step-0000008"
    assert model.pretrained_source == {"kind": "run", "path": str(ck), "step": 8}
    weights = load_file(str(ck / "model.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert model.config.to_dict() == json.loads((run / "config.json").read_text())["model_resolved"]


def test_loads_a_checkpoint_directory(run):
    ck = run / "checkpoints" / "step-0000006"
    model = TwoSimplicialLM.from_pretrained(str(ck))
    assert model.pretrained_source == {"kind": "checkpoint", "path": str(ck), "step": 6}
    weights = load_file(str(ck / "model.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    latest = TwoSimplicialLM.from_pretrained(run)                # step 8: training moved the weights
    x = tokens(model.config)
    assert not torch.equal(logits(model, x), logits(latest, x))


def test_load_model_is_from_pretrained_plus_the_run_config(run):
    model, cfg = load_model(run)
    assert cfg["checkpoint"] == {"name": "step-0000008", "step": 8}
    assert cfg["data"]["task"] == "lm" and not model.training
    x = tokens(model.config)
    assert torch.equal(logits(model, x), logits(TwoSimplicialLM.from_pretrained(run), x))


def test_saved_copy_of_a_run_matches_it(run, tmp_path):
    model = TwoSimplicialLM.from_pretrained(run)
    again = TwoSimplicialLM.from_pretrained(model.save_pretrained(tmp_path / "copy"))
    x = tokens(model.config)
    assert torch.equal(logits(model, x), logits(again, x))


def test_device_argument(saved):
    model, out = saved
    loaded = TwoSimplicialLM.from_pretrained(out, device=torch.device("cpu"))
    assert loaded.embed.weight.device == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        TwoSimplicialLM.from_pretrained(out, device="nonsense")
    with pytest.raises(TypeError, match="device"):
        TwoSimplicialLM.from_pretrained(out, device=0.5)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_corrupt_saved_file_is_refused(saved, name):
    _, out = saved
    raw = bytearray((out / name).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (out / name).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{name}: SHA-256 does not match"):
        TwoSimplicialLM.from_pretrained(out)


def test_a_corrupt_checkpoint_is_refused_when_named(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ck = copy / "checkpoints" / "step-0000008"
    raw = bytearray((ck / "model.safetensors").read_bytes())
    raw[-10] ^= 0x01
    (ck / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors: SHA-256 does not match"):
        TwoSimplicialLM.from_pretrained(ck)                      # named: no fallback
    assert TwoSimplicialLM.from_pretrained(copy).pretrained_source["step"] == 6   # the run falls back


def test_an_interrupted_save_is_refused(saved):
    _, out = saved
    (out / "manifest.json").unlink()                             # what a save killed before its last write leaves
    with pytest.raises(CheckpointError, match="no manifest.json"):
        TwoSimplicialLM.from_pretrained(out)


def test_weights_that_do_not_fit_the_config_are_refused(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["n_layers"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    mf = json.loads((out / "manifest.json").read_text())
    mf["files"]["config.json"] = file_sha256(out / "config.json")
    (out / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(ValueError, match="does not fit the model of"):
        TwoSimplicialLM.from_pretrained(out)
    cfg["n_layers"], cfg["bogus"] = 2, 1
    (out / "config.json").write_text(json.dumps(cfg))
    mf["files"]["config.json"] = file_sha256(out / "config.json")
    (out / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(ValueError, match="config.json.*bogus"):
        TwoSimplicialLM.from_pretrained(out)


def test_bad_paths(tmp_path, run):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TwoSimplicialLM.from_pretrained(tmp_path / "missing")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is not a directory"):
        TwoSimplicialLM.from_pretrained(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a run directory .*, a checkpoint directory"):
        TwoSimplicialLM.from_pretrained(tmp_path / "empty")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        TwoSimplicialLM.from_pretrained(3)
    fresh = tmp_path / "fresh"                                  # a run that has not checkpointed yet
    fresh.mkdir()
    shutil.copy(run / "config.json", fresh / "config.json")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        TwoSimplicialLM.from_pretrained(fresh)
    orphan = tmp_path / "orphan" / "checkpoints"                 # a checkpoint without its run's config
    shutil.copytree(run / "checkpoints" / "step-0000006", orphan / "step-0000006")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        TwoSimplicialLM.from_pretrained(orphan / "step-0000006")


def test_save_refuses_bad_targets(saved, run, tmp_path):
    model, _ = saved
    before = (run / "config.json").read_bytes()
    with pytest.raises(ValueError, match="training run"):
        model.save_pretrained(run)
    with pytest.raises(ValueError, match="training run"):
        model.save_pretrained(run / "checkpoints" / "step-0000008")
    assert (run / "config.json").read_bytes() == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        model.save_pretrained(tmp_path / "file")
    with pytest.raises(TypeError, match="tokenizer must be a tokenizers.Tokenizer"):
        model.save_pretrained(tmp_path / "m", tokenizer="tokenizer.json")
    with pytest.raises(TypeError, match="directory must be a str or os.PathLike"):
        model.save_pretrained(None)
    assert not (tmp_path / "m").exists()


def test_no_temporary_files_are_left(saved):
    _, out = saved
    assert sorted(p.name for p in Path(out).iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                           "tokenizer.json"]


@pytest.mark.gpu
def test_loads_onto_the_gpu(saved):
    model, out = saved
    loaded = TwoSimplicialLM.from_pretrained(out, device="cuda")
    assert loaded.embed.weight.is_cuda and loaded.head.weight is loaded.embed.weight
    x = tokens(model.config)
    torch.testing.assert_close(logits(loaded, x.cuda()).cpu(), logits(model.eval(), x), rtol=1e-3, atol=1e-3)
