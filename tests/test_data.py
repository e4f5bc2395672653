"""Data: tokenizer round trip, corpus build, loader determinism and resume, Match3 labels, math answers."""
import json
import os
import re
import sysconfig

import numpy as np
import pytest
import torch

from twosimplicial.data import (
    CodeCorpus, CodeCorpusConfig, DataConfig, MixtureLoader, TokenChunks, build_code_corpus, evaluate_ops,
    make_data, match3_labels, math_problems, train_bpe,
)
from twosimplicial.data.match3 import Match3Source, balanced_modulus, positive_rate
from twosimplicial.data.math import is_heldout

STDLIB = sysconfig.get_paths()["stdlib"]
TINY_ROOTS = [os.path.join(STDLIB, "json"), os.path.join(STDLIB, "email")]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    cfg = CodeCorpusConfig(roots=TINY_ROOTS, vocab_size=400, val_fraction=0.2)
    return build_code_corpus(cfg, tmp_path_factory.mktemp("cache"), progress=False)


def test_tokenizer_round_trip():
    texts = ["def f(x):\n    return x + 1\n", "class A:\n\tpass  # tabs\n", "print('héllo ✓ 世界')\r\n"]
    tok = train_bpe(texts * 20, vocab_size=300)
    for t in texts + ["\x00\x7f unseen bytes \U0001F600", ""]:
        assert tok.decode(tok.encode(t).ids) == t


def test_corpus_manifest_and_round_trip(corpus_dir):
    m = json.loads((corpus_dir / "manifest.json").read_text())
    c = CodeCorpus(corpus_dir)
    for split in ("train", "val"):
        assert m["splits"][split]["files"] > 0
        toks = c.tokens(split)
        assert len(toks) == m["splits"][split]["tokens"] and toks.dtype == np.uint16
        assert int(toks.max()) < m["vocab_size"]
    assert m["splits"]["train"]["files"] + m["splits"]["val"]["files"] + m["scan"]["duplicates"] \
        + m["scan"]["skipped_large"] + m["scan"]["skipped_undecodable"] == m["scan"]["found"]
    # the first training document decodes back to one of the source files, byte for byte
    toks = np.asarray(c.tokens("train"))
    first = toks[: int(np.argmax(toks == c.eos_id))]
    text = c.tokenizer.decode(first.tolist())
    sources = [open(os.path.join(d, f), encoding="utf-8").read()
               for r in TINY_ROOTS for d, _, fs in os.walk(r) for f in fs if f.endswith(".py")]
    assert text in sources
    # rebuilding with the same settings reuses the cache (same directory, untouched files)
    again = build_code_corpus(CodeCorpusConfig(roots=TINY_ROOTS, vocab_size=400, val_fraction=0.2),
                              corpus_dir.parent, progress=False)
    assert again == corpus_dir


def test_corpus_dedup_and_split_by_content(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    bodies = [f"def f{i}():\n    return {i} * {i}\n" * 5 for i in range(40)]
    for i, b in enumerate(bodies):
        (src / "a" / f"m{i}.py").write_text(b)
    for i in range(10):                                  # exact duplicates under other names
        (src / "b" / f"copy{i}.py").write_text(bodies[i])
    (src / "b" / "latin1.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8: skipped
    cfg = CodeCorpusConfig(roots=[str(src)], vocab_size=300, val_fraction=0.25)
    m = json.loads((build_code_corpus(cfg, tmp_path / "c", progress=False) / "manifest.json").read_text())
    assert m["scan"] == {"found": 51, "skipped_large": 0, "skipped_undecodable": 1, "duplicates": 10}
    assert m["splits"]["train"]["files"] + m["splits"]["val"]["files"] == 40
    # the split depends on content only: another walk order (one more root) gives the same val count
    cfg2 = CodeCorpusConfig(roots=[str(src / "b"), str(src / "a")], vocab_size=300, val_fraction=0.25)
    m2 = json.loads((build_code_corpus(cfg2, tmp_path / "c", progress=False) / "manifest.json").read_text())
    assert m2["splits"]["val"]["files"] == m["splits"]["val"]["files"]


def test_corpus_does_not_follow_links_out_of_its_root(tmp_path):
    from twosimplicial.data.code import collect_files
    src, outside = tmp_path / "src", tmp_path / "secret"
    src.mkdir()
    outside.mkdir()
    (src / "a.py").write_text("a = 1\n")
    (src / "b.py").write_text("b = 2\n")
    (outside / "key.py").write_text("TOKEN = 'not for the corpus'\n")
    os.symlink(outside / "key.py", src / "link_out.py")
    os.symlink(src / "b.py", src / "link_in.py")             # inside the root: a duplicate, harmless
    os.symlink(outside, src / "dir_out")                     # directory links are not walked either
    files, stats = collect_files(CodeCorpusConfig(roots=[str(src)]))
    assert sorted(os.path.basename(p) for _, p in files) in (["a.py", "b.py"], ["a.py", "link_in.py"])
    assert stats["duplicates"] == 1


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_loader_deterministic_and_resumes_mid_epoch():
    tokens = np.arange(1000, dtype=np.uint16)
    srcs = lambda: {"a": TokenChunks(tokens, 16, seed=3), "b": TokenChunks(tokens[::-1].copy(), 8 * 2, seed=4)}  # noqa: E731
    mk = lambda: MixtureLoader(srcs(), {"a": 0.7, "b": 0.3}, batch_size=5, seed=11)  # noqa: E731
    a, b = mk(), mk()
    ref = _take(a, 40)                                   # 200 rows over ~61 windows a source: several epochs
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(ref, _take(b, 40)))
    assert max(a.epochs().values()) > 2
    # targets are inputs shifted by one
    x, y = ref[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    # resume from the middle of an epoch
    c = mk()
    _take(c, 13)
    state = json.loads(json.dumps(c.state_dict()))       # survives a JSON round trip
    d = mk()
    d.load_state_dict(state)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(ref[13:], _take(d, 27)))
    # within an epoch every window appears once
    e = MixtureLoader({"a": TokenChunks(tokens, 16, seed=3)}, batch_size=len(TokenChunks(tokens, 16)), seed=0)
    starts = sorted(e.next_batch()[0][:, 0].tolist())
    assert starts == list(range(0, 16 * len(starts), 16))


def test_loader_ranks_partition_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint32)
    mk = lambda r, w, b: MixtureLoader({"a": TokenChunks(tokens, 8, 1), "m": Match3Source(8, 18, 0)},  # noqa: E731
                                       {"a": 0.5, "m": 0.5}, batch_size=b, seed=5, rank=r, world_size=w)
    whole = _take(mk(0, 1, 6), 4)
    parts = [_take(mk(r, 2, 3), 4) for r in range(2)]
    for t in range(4):
        assert torch.equal(torch.cat([parts[0][t][0], parts[1][t][0]]), whole[t][0])


def test_loader_rejects_bad_arguments():
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(ValueError, match="weights"):
        MixtureLoader({"a": TokenChunks(tokens, 8)}, {"b": 1.0}, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        MixtureLoader({"a": TokenChunks(tokens, 8)}, batch_size=0)
    with pytest.raises(ValueError, match="seq_len"):
        TokenChunks(tokens, 0)
    with pytest.raises(ValueError, match="too short"):
        TokenChunks(tokens[:5], 8)
    ld = MixtureLoader({"a": TokenChunks(tokens, 8)}, batch_size=2, seed=1)
    with pytest.raises(ValueError, match="seed"):
        ld.load_state_dict({**ld.state_dict(), "seed": 2})


def _match3_brute(x, M):
    n = len(x)
    return [int(any((x[i] + x[j] + x[k]) % M == 0 for j in range(i + 1) for k in range(i + 1))) for i in range(n)]


@pytest.mark.parametrize("n,M", [(1, 3), (7, 5), (12, 17), (20, 40)])
def test_match3_labels_match_brute_force(n, M):
    rng = np.random.default_rng(n * 100 + M)
    x = rng.integers(0, M, size=(16, n))
    y = match3_labels(x, M)
    for b in range(16):
        assert y[b].tolist() == _match3_brute(x[b].tolist(), M)


def test_match3_balance_and_source():
    M = balanced_modulus(32)
    assert abs(positive_rate(32, M).mean() - 0.5) < 0.05
    s = Match3Source(32, M, seed=0)
    x1, y1 = s.get_many(np.array([5, 9]))
    x2, _ = s.get_many(np.array([9]))
    assert torch.equal(torch.from_numpy(x1[1]), torch.from_numpy(x2[0]))
    xv, _ = Match3Source(32, M, seed=0, split="val").get_many(np.array([5]))
    assert not np.array_equal(xv[0], x1[0])
    assert np.array_equal(y1, match3_labels(x1, M))
    with pytest.raises(ValueError, match="M"):
        match3_labels(np.array([[0, 5]]), 5)


_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def test_math_answers_are_correct_and_heldout_is_disjoint():
    train = math_problems(300, seed=0, split="train")
    held = math_problems(60, seed=0, split="eval")
    assert not {p.question for p in train} & {p.question for p in held}
    assert all(is_heldout(p) for p in held) and not any(is_heldout(p) for p in train)
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for p in train + held:
        eqs = _EQ.findall(p.solution)
        assert eqs
        for a, op, b, c in eqs:                         # every written step is right
            a, b, c = int(a), int(b), int(c)
            assert ops[op](a, b) == c and (op != "/" or a % b == 0)
        assert int(eqs[-1][3]) == p.answer              # the last step gives the answer
        assert p.solution.endswith(f"#### {p.answer}")
        assert evaluate_ops(p.start, p.ops) == p.answer  # independent recomputation
        assert f"has {p.start} " in p.question
    assert math_problems(50, seed=0) == train[:50]      # deterministic


def test_make_data_lm(corpus_dir):
    cfg = DataConfig.from_dict(dict(task="lm", seq_len=32, batch_size=4, cache_dir=str(corpus_dir.parent),
                                    code_roots=TINY_ROOTS, vocab_size=400, val_fraction=0.2, math_problems=200,
                                    weights={"code": 0.5, "math": 0.5}))
    d = make_data(cfg, seed=0, progress=False)
    x, y = d.train.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert d.vocab_size == 400 and d.output_size is None
    assert set(d.val_sources) == {"code", "math"}
    vb = d.val_batches("math", 2, 3)
    assert len(vb) == 2 and vb[0][0].shape == (3, 32)
    with pytest.raises(ValueError, match="unknown"):
        DataConfig.from_dict({"nope": 1})


def test_data_config_rejects_bad_match3_seq_len_and_weights():
    cfg = DataConfig.from_dict({"task": "match3", "match3_n": 16, "match3_M": 55})
    assert cfg.seq_len == 16
    assert DataConfig.from_dict({"task": "match3", "match3_n": 16, "match3_M": 55, "seq_len": 16}).seq_len == 16
    with pytest.raises(ValueError, match="data.seq_len"):
        DataConfig.from_dict({"task": "match3", "match3_n": 16, "match3_M": 55, "seq_len": 999})
    with pytest.raises(ValueError, match=r"data.weights.*'cod'"):
        DataConfig.from_dict({"weights": {"code": 1.0, "cod": 0}})
    with pytest.raises(ValueError, match="data.weights.math"):
        DataConfig.from_dict({"weights": {"code": 1.0, "math": -0.1}})
    with pytest.raises(TypeError, match="data.weights.math"):
        DataConfig.from_dict({"weights": {"code": 1.0, "math": "0.1"}})
    with pytest.raises(TypeError, match="data.weights"):
        DataConfig.from_dict({"weights": [1.0]})
    with pytest.raises(ValueError, match="positive"):
        DataConfig.from_dict({"weights": {"code": 0, "math": 0.0}})


@pytest.mark.parametrize("vocab", [257, True, 300.0, "400"])
def test_corpus_config_checks_vocab_size_before_walking(tmp_path, vocab):
    cfg = CodeCorpusConfig(roots=[str(tmp_path / "missing")], vocab_size=vocab)
    with pytest.raises(ValueError, match="vocab_size"):      # raised before the roots are even resolved
        build_code_corpus(cfg, tmp_path, progress=False)
