"""The Lightning callback with a real lightning Trainer on the CPU."""

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from logitwatch.agent import LogitwatchLightningCallback, MonitorConfig  # noqa: E402
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn  # noqa: E402
from logitwatch.agent.transport.sink import MemorySink  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, T, B = 128, 16, 2


class LitDecoder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = Decoder(
            DecoderConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=T)
        )
        self.pre_clip = {}

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        ce, z = loss_fn(self.model(idx), idx, z_loss=1e-4)
        return ce + z

    def on_before_optimizer_step(self, optimizer):  # runs after the callbacks', before clipping
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.pre_clip[self.global_step + 1] = float(
            torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        )

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_lightning_callback_reports_every_probe(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randint(0, V, (12, T)))
    sink = MemorySink()
    config = MonitorConfig(param_every=2)  # the weights on every report, too
    callback = LogitwatchLightningCallback("lit", every=2, sink=sink, config=config)
    module = LitDecoder()
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1e-3,
        default_root_dir=tmp_path, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=B))
    assert callback.monitor is None
    steps, grad = sink.series("grad.norm")
    assert steps == [1, 2, 4]
    for step, value in zip(steps, grad, strict=True):
        assert value == pytest.approx(module.pre_clip[step], rel=1e-5)
        assert value > 1e-2  # clipping at 1e-3 was active
    assert sink.series("attn.logit_max", layer=1, head=3)[0] == [1, 2, 4]
    assert sink.series("act.rms", layer=0)[0] == [1, 2, 4]
    assert sink.series("update.ratio", layer=1)[0] == [1, 2, 4]
    assert all(v > 0 for v in sink.series("loss")[1])
    assert sink.series("throughput.tokens_per_s")[0] == [2, 4]
    assert not any(len(m._forward_hooks) for m in module.modules())


def test_lightning_callback_names_undelivered_points_at_train_end(tmp_path, caplog):
    from helpers.server import free_port

    from logitwatch.agent import MonitorConfig

    data = torch.utils.data.TensorDataset(torch.randint(0, V, (4, T)))
    down = f"http://127.0.0.1:{free_port()}"  # nobody listens: every point stays spooled
    callback = LogitwatchLightningCallback("lit-down", server=down, spool_dir=tmp_path / "spool",
                                           config=MonitorConfig(close_timeout_s=1.0))  # fmt: skip
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[callback],
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="logitwatch.agent"):
        trainer.fit(LitDecoder(), torch.utils.data.DataLoader(data, batch_size=B))
    u = callback.undelivered
    assert u is not None and u.steps == 2 and u.spool_dir == (tmp_path / "spool").resolve()
    assert any(u.command in r.getMessage() for r in caplog.records)
