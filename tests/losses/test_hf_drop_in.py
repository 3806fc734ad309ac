"""The Hugging Face drop-in: label shifting and gradient-accumulation scaling exactly as
transformers' causal-LM loss, and a tiny LlamaForCausalLM trained with ``transformers.Trainer``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpls.losses import dpls_loss, make_hf_loss
from loss_reference import distinct_logits


def _batch():
    logits = distinct_logits(3 * 8, 50).reshape(3, 8, 50)
    labels = torch.randint(0, 50, (3, 8))
    labels[1, :3] = -100
    return logits, labels


def test_equals_dpls_on_manually_shifted_tensors():
    logits, labels = _batch()
    got = make_hf_loss(epsilon=0.2, top_k=6)({"logits": logits}, labels)
    want = dpls_loss(logits[:, :-1, :], labels[:, 1:], epsilon=0.2, top_k=6)
    torch.testing.assert_close(got, want)


def test_num_items_in_batch_divides_the_sum_like_transformers():
    logits, labels = _batch()
    fn = make_hf_loss(epsilon=0.0, top_k=1)
    got = fn(logits, labels, num_items_in_batch=torch.tensor(40))
    # transformers' ForCausalLMLoss with ε = 0: sum of CE over shifted labels / num_items_in_batch.
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    want = F.cross_entropy(logits.reshape(-1, 50), shifted.reshape(-1), reduction="sum") / 40
    torch.testing.assert_close(got, want)
    # ε = 0 through make_hf_loss is transformers' own causal-LM loss (when transformers has it).
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.testing.assert_close(got, ForCausalLMLoss(logits, labels, 50, num_items_in_batch=torch.tensor(40)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        make_hf_loss(epsilon=1.2)
    with pytest.raises(ValueError, match="top_k"):
        make_hf_loss(top_k=0)
    with pytest.raises(ValueError, match="labels"):
        make_hf_loss()(torch.randn(1, 4, 200), None)


@pytest.mark.slow
def test_trainer_with_gradient_accumulation_trains_a_tiny_llama(tmp_path):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    # A learnable pattern: each sequence counts upwards from a random start.
    starts = torch.randint(0, 128, (32, 1))
    ids = (starts + torch.arange(24)) % 128
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, compute_loss_func=make_hf_loss(epsilon=0.1, top_k=10)
    )
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result.training_loss) and losses[-1] < losses[0]
