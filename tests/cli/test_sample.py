"""`dpls sample` on a tiny run trained in the test: determinism, seeds, errors, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from data_helpers import write_data_dir
from dpls.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    "the cat sat on the mat and looked at the dog.",
    "a dog ran in the park; the cat did not.",
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())\n",
    "héllo wörld: naïve café, ünïcode bytes ✓",
]


def make_text_data(root: Path) -> Path:
    """A data directory of real text: a byte-level BPE (vocabulary ~300) and its shards."""
    from dpls.data.tokenizer import train_bpe

    tok = train_bpe(DOCS * 20, vocab_size=300)
    rng = np.random.default_rng(0)
    stream = [t for i in rng.integers(0, len(DOCS), 600) for t in [tok.eot, *tok.encode(DOCS[i])]]
    tokens = np.array(stream, dtype=np.int64)
    split = len(tokens) * 9 // 10
    write_data_dir(root, [tokens[:split]], [tokens[split:]], vocab_size=tok.vocab_size)
    assert tok.eot == 0  # write_data_dir's meta says so
    tok.save(root / "tokenizer.json")
    return root


def train_tiny_run(data: Path, out: Path, steps: int = 8, **extra: object) -> Path:
    """A few steps of `dpls train` on ``data``: a run directory with a checkpoint and tokenizer."""
    values: dict[str, object] = {
        "data_dir": data,
        "out_dir": out,
        "model": "tiny",
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "block_size": 64,
        "batch_size": 4,
        "max_iters": steps,
        "learning_rate": 1e-2,
        "warmup_iters": 1,
        "eval_interval": steps,
        "eval_tokens": 256,
        "log_interval": steps,
        "checkpoint_interval": steps,
        "device": "cpu",
        "dtype": "float32",
        "progress": False,
        **extra,
    }
    assert main(["train", *(f"--{k}={v}" for k, v in values.items())]) == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    return train_tiny_run(make_text_data(root / "data"), root / "run")


def _files(root: Path) -> dict[str, float]:
    return {
        str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def sample(capsys, run: Path, *args: str) -> str:
    capsys.readouterr()
    assert main(["sample", str(run), "--device=cpu", *args]) == 0
    return capsys.readouterr().out


def test_same_seed_same_text_other_seed_other_text(run, capsys):
    args = ("--num-samples=3", "--max-new-tokens=40", "--temperature=1.0", "--prompt=the cat")
    a = sample(capsys, run, *args, "--seed=1")
    assert a == sample(capsys, run, *args, "--seed=1")
    assert a != sample(capsys, run, *args, "--seed=2")
    samples = a.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3 and all(s.startswith("the cat") for s in samples)
    assert len(set(samples)) > 1  # one generator across the samples: they differ from each other


def test_greedy_is_seed_independent_and_top_k_1_is_greedy(run, capsys):
    args = ("--max-new-tokens=30", "--prompt=a dog")
    greedy = sample(capsys, run, *args, "--temperature=0", "--seed=1")
    assert greedy == sample(capsys, run, *args, "--temperature=0", "--seed=2")
    assert greedy == sample(capsys, run, *args, "--top-k=1", "--seed=3")


def test_prompt_file_empty_prompt_and_verbose(run, capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("import os", encoding="utf-8")
    via_file = sample(capsys, run, f"--prompt-file={prompt}", "--max-new-tokens=20")
    assert via_file == sample(capsys, run, "--prompt=import os", "--max-new-tokens=20")
    capsys.readouterr()
    assert main(["sample", str(run), "--device=cpu", "--max-new-tokens=20", "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err


def test_sampling_from_a_checkpoint_dir_equals_the_run(run, capsys):
    checkpoint = next((run / "checkpoints").iterdir())
    args = ("--max-new-tokens=25", "--seed=4")
    assert sample(capsys, run, *args) == sample(capsys, checkpoint, *args)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--temperature=-1"], "--temperature"),
        (["--top-k=0"], "--top-k"),
        (["--top-k=100000"], "--top-k"),
        (["--top-p=0"], "--top-p"),
        (["--top-p=1.5"], "--top-p"),
        (["--max-new-tokens=0"], "--max-new-tokens"),
        (["--max-new-tokens=64"], "block_size 64"),  # <|endoftext|> + 64 > 64
        (["--num-samples=0"], "--num-samples"),
        (["--prompt-file=/nonexistent/prompt.txt"], "--prompt-file"),
        (["--device=nonsense"], "device"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(run, capsys, args, match):
    before = _files(run)
    cwd_before = set(os.listdir("."))
    capsys.readouterr()
    assert main(["sample", str(run), "--device=cpu", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpls sample: error:") and match in lines[0]
    assert _files(run) == before and set(os.listdir(".")) == cwd_before


def test_a_bad_run_exits_2(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["sample", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("dpls sample: error:") for line in err)
