"""The Hugging Face Trainer runs of the tests: a tiny BERT classifier built from a config
(no downloads), and the hand-written adabatch loop on the same model and data."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
from transformers.data.data_collator import default_data_collator

from adabatch.batching import AdaptiveBatchSampler, MicroBatchStats, PerSampleStats
from adabatch.integrations.transformers import AdaptiveBatchTrainer

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.integrations import _common as c

SEQ = 6


class Tokens(Dataset):
    """c.N sequences of SEQ token ids; the label depends on the first token."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 32, (c.N, SEQ), generator=gen)
        self.labels = (self.ids[:, 0] < 16).long()

    def __len__(self) -> int:
        return c.N

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.labels[i], "idx": i}


def model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=16,
                        max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(config)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return default_data_collator(items)


class Recording(AdaptiveBatchTrainer):
    """Records the sample indices of every micro-batch (and drops them before the model)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []
        self.batches: list[list[int]] = []

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kw: Any) -> Any:
        self.seen += inputs.pop("idx").tolist()
        return super().compute_loss(model, inputs, *args, **kw)

    def training_step(self, model: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not getattr(
                self, "_counting", False):
            model.register_comm_hook(None, c.counting_hook)  # count DDP's all-reduces
            self._counting = True
        loss = super().training_step(model, *args, **kwargs)
        self.batches.append(self.seen)
        self.seen = []
        return loss


def run(steps: int, estimator: str = "per-sample", *, out: str, save_steps: int = 0,
        resume: str | None = None) -> dict[str, Any]:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=c.MICRO, use_cpu=True,
        report_to=[], max_grad_norm=0.0, logging_steps=1, seed=0, disable_tqdm=True,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        remove_unused_columns=False, dataloader_num_workers=0, ddp_find_unused_parameters=False)
    controller = c.controller()
    trainer = Recording(model=net, args=args, train_dataset=Tokens(), data_collator=collate,
                        optimizers=(opt, sched), batch_controller=controller,
                        estimator=estimator, sampler_seed=c.SEED)
    trainer.train(resume_from_checkpoint=resume)
    logs = [row for row in trainer.state.log_history if "loss" in row]
    return {"rank": trainer.args.process_index, "batches": trainer.batches,
            "history": controller.history, "params": c.flat_params(net), "logs": logs,
            "allreduces": c.ALLREDUCES[0]}


def reference(steps: int, estimator: str = "per-sample") -> dict[str, Any]:
    """The plain adabatch loop on the same model and data."""
    data, net = Tokens(), model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ctl = c.controller()
    sampler = AdaptiveBatchSampler(c.N, c.MICRO, seed=c.SEED)
    cls = PerSampleStats if estimator == "per-sample" else MicroBatchStats
    est = cls(net, needs=ctl.needs)
    batches = []
    for _ in range(steps):
        micro = sampler.take(ctl.batch_size)
        batches.append(torch.cat(micro).tolist())
        opt.zero_grad()
        with est.step(ctl.wants_stats()) as step:
            for idx in micro:
                batch = collate([data[i] for i in idx.tolist()])
                batch.pop("idx")
                with step.micro_batch(len(idx)):
                    (net(**batch).loss / len(micro)).backward()
        stats = est.stats() if step.measuring else None
        opt.step()
        ctl.update(stats)
    return {"batches": batches, "history": ctl.history, "params": c.flat_params(net)}


if __name__ == "__main__":
    out, steps, est = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    result = run(steps, est, out=str(Path(out).parent / "hf"))
    Path(f"{out}.{result['rank']}.json").write_text(json.dumps(result))
