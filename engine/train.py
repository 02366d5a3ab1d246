"""Train SiT/DiT with Dispersive Loss on DeepSpeed ZeRO.

    deepspeed engine/train.py --model sit_xl --data /data/imagenet-latents --disp-preset release
    torchrun --nproc-per-node 8 engine/train.py --model sit_b --zero-stage 1
    python engine/train.py --model sit_s --data digits --max-steps 200 --global-batch 64

Every config field is a flag (``--help`` lists them); ``--config run.json`` loads a
saved config (``results_dir/config.json``) and flags override it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models
from engine.data.datasets import BUILT_IN, check_dataset
from engine.data.format import LatentDatasetError, open_latent_dataset
from engine.config.flags import add_config_arguments, apply_overrides, config_from_dict, config_to_dict, overrides_from_args
from engine.training.config import TrainConfig
from engine.training.metrics import WANDB_MISSING, wandb_available
from engine.training.checkpoint import CheckpointDir, CheckpointError, check_checkpoint_folder, saved_config
from engine.training.resume import check_resume
from engine.training.trainer import NonFiniteError, Trainer
from engine.objectives.dispersive import DispersiveConfig
from engine.objectives.meanflow_presets import MEANFLOW_PRESETS, meanflow_preset

# ZeRO calls torch's all_gather_into_tensor, deprecated in torch 2.13: DeepSpeed's business, not
# the user's, and it would repeat on every rank of every run.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line (per rank, under a launcher), not the 3 kB usage text above it."""
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists the options)\n")


def parse(argv: list[str] | None = None) -> TrainConfig:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON config to start from (e.g. a run's config.json)")
    parser.add_argument("--disp-preset", choices=["paper", "release", "none"],
                        help="Dispersive Loss preset: release (the default: lambda 0.25, tau 1, last "
                             "block), paper (lambda 0.5, tau 0.5, block depth//4) or none (the baseline); "
                             "--disp-* flags override it")
    parser.add_argument("--meanflow-preset", choices=MEANFLOW_PRESETS,
                        help="MeanFlow one-step training with the published recipe (model, objective, "
                             "Adam beta2 0.95, lr 1e-4, batch 256, EMA 0.9999, the run length in steps); "
                             "other flags override it")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers
    add_config_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    try:
        cfg = TrainConfig()
        if args.config:
            with open(args.config) as f:
                cfg = config_from_dict(TrainConfig, json.load(f))
        overrides = overrides_from_args(args)
        if args.meanflow_preset:
            cfg = _apply_meanflow_preset(cfg, args.meanflow_preset)
        if args.disp_preset:
            cfg = dataclasses.replace(cfg, dispersive=DispersiveConfig.preset(args.disp_preset))
        cfg = apply_overrides(cfg, overrides)
        check_before_launch(cfg)
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as e:
        parser.error(str(e))
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        sys.exit(0)
    return cfg


def _apply_meanflow_preset(cfg: TrainConfig, name: str) -> TrainConfig:
    preset = meanflow_preset(name)
    flat: dict[tuple[str, ...], object] = {("objective",): "meanflow", ("model", "name"): preset.model}
    if "class_dropout_prob" in preset.model_overrides:  # the others follow from --objective meanflow
        flat[("model", "class_dropout_prob")] = preset.model_overrides["class_dropout_prob"]
    for key, value in preset.train.items():  # nested like TrainConfig
        if isinstance(value, dict):
            flat.update({(key, k): v for k, v in value.items()})
        else:
            flat[(key,)] = value
    cfg = apply_overrides(cfg, flat)
    return dataclasses.replace(cfg, meanflow=preset.meanflow)


def check_before_launch(cfg: TrainConfig) -> None:
    """Everything that can fail is checked here, before any process group or model exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.batch_layout(world)
    check_dataset(cfg.data.data)
    if cfg.data.data not in BUILT_IN:
        open_latent_dataset(cfg.data.data)  # manifest, every shard's size and every label, named by file
    depth = models.get_config(cfg.model.name, **cfg.model.overrides()).depth
    if cfg.dispersive.enabled:
        cfg.dispersive.resolve(depth)  # e.g. --disp-blocks 7 on a 2-block model: named here, not on every rank
    if cfg.deepspeed_config:
        if not Path(cfg.deepspeed_config).exists():
            raise FileNotFoundError(f"--deepspeed-config {cfg.deepspeed_config}: no such file")
        try:
            json.loads(Path(cfg.deepspeed_config).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--deepspeed-config {cfg.deepspeed_config}: not valid JSON ({e})") from None
    if cfg.wandb and not wandb_available():
        raise ValueError(WANDB_MISSING)
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_dir():
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint directory (or use --resume auto)")
    resume = CheckpointDir(Path(cfg.results_dir) / "checkpoints").resolve_resume(cfg.resume)
    if resume is not None:
        check_checkpoint_folder(resume, ranks=world)  # whole, undamaged, and no file that could run code
        saved = saved_config(resume)
        if saved is not None:
            check_resume(saved, config_to_dict(cfg), resume)  # the settings fixed for a run are unchanged


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(argv)
    trainer = Trainer(cfg)
    if trainer.is_main:
        with open(Path(cfg.results_dir) / "config.json", "w") as f:
            json.dump(config_to_dict(cfg), f, indent=2)
    return trainer.fit()


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, NonFiniteError, LatentDatasetError) as e:  # named, with what to do: no traceback
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, (CheckpointError, LatentDatasetError)) else 1)
