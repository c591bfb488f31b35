"""GAN training and generation speed on the CPU: the DCGAN design against the MLP baseline, in the same run.

Training images per second time ``vislang.generate.train.gan_step`` (the loop's own step: D update on real, fake and
mismatched pairs, G update, EMA update) at the batch size of ``configs/gan.yaml``; generation images per second time
the generator forward in eval mode, chunks of 256, uint8 output (what ``vislang generate`` does after embedding the
prompt). Weights are random: speed does not depend on them. The ratio DCGAN / MLP is printed on its own line.

    python benchmarks/gan_throughput.py --threads 1            # ~1 minute
    python benchmarks/gan_throughput.py --smoke                # seconds: checks that it runs
    python benchmarks/gan_throughput.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from vislang.config import from_dict, load_file
from vislang.models.gan.build import build_gan
from vislang.models.gan.networks import GANModelConfig, to_uint8
from vislang.train.config import GANConfig
from vislang.train.tasks.gan_step import gan_step

CONFIGS = {"dcgan": "src/vislang/configs/gan.yaml", "mlp": "src/vislang/configs/gan-mlp.yaml"}


def bench(name: str, steps: int, batch: int, gen_images: int, repeats: int) -> dict:
    run = load_file(CONFIGS[name])
    gan = from_dict(GANConfig, run["gan"], "gan")
    cfg = from_dict(GANModelConfig, {**gan.model, "cond_dim": 128, "image_size": 28, "channels": 1}, "gan.model")
    torch.manual_seed(0)
    g, d = build_gan(cfg)
    if cfg.arch == "dcgan":  # as the training loop does on a CPU
        g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
    g_ema = copy.deepcopy(g).eval() if gan.ema_decay > 0 else g
    opt_g = torch.optim.Adam(g.parameters(), lr=gan.lr_g, betas=gan.betas)
    opt_d = torch.optim.Adam(d.parameters(), lr=gan.lr_d, betas=gan.betas)
    real = torch.rand(batch, 1, 28, 28) * 2 - 1
    cond = torch.nn.functional.normalize(torch.randn(batch, 128), dim=1)
    mis = torch.Generator().manual_seed(0)
    for _ in range(2):  # warm-up
        gan_step(g, d, g_ema, opt_g, opt_d, real, cond, gan, mis)
    t = time.perf_counter()
    for _ in range(steps):
        gan_step(g, d, g_ema, opt_g, opt_d, real, cond, gan, mis)
    train_s = (time.perf_counter() - t) / steps
    return {
        "arch": name,
        "generator_params": sum(p.numel() for p in g.parameters()),
        "discriminator_params": sum(p.numel() for p in d.parameters()),
        "train_step_s": train_s,
        "train_images_per_s": batch / train_s,
        "generate_images_per_s": generate_speed(g_ema, cfg.z_dim, gen_images, repeats),
    }


def generate_speed(g: torch.nn.Module, z_dim: int, gen_images: int, repeats: int) -> float:
    """Images per second of ``g`` in eval mode, chunks of 256, uint8 out: the best of ``repeats`` passes."""
    g.eval()
    z, c = torch.randn(gen_images, z_dim), torch.nn.functional.normalize(torch.randn(gen_images, 128), dim=1)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            out = [to_uint8(g(z[s : s + 256], c[s : s + 256])) for s in range(0, gen_images, 256)]
            best = min(best, time.perf_counter() - t)
    assert sum(len(o) for o in out) == gen_images
    return gen_images / best


def shipped_pool(bank: int) -> torch.nn.Module:
    """The Fashion-MNIST model the README reports, with random weights: a pool (`vislang generate-ensemble`) of one
    `gan`-config generator and two IC-GANs, each IC-GAN holding a bank of ``bank`` instances it searches per image."""
    from vislang.models.gan.build import build_generator
    from vislang.models.gan.ensemble import GeneratorEnsemble

    run = load_file(CONFIGS["dcgan"])
    base = {**run["gan"]["model"], "cond_dim": 128, "image_size": 28, "channels": 1}
    ic = {**base, "instance_bank": bank, "instance_dim": 128}
    members = [build_generator(from_dict(GANModelConfig, m, "gan.model")) for m in (base, ic, ic)]
    for m in members[1:]:
        m.set_bank(torch.nn.functional.normalize(torch.randn(bank, 128), dim=1),
                   torch.nn.functional.normalize(torch.randn(bank, 128), dim=1))  # fmt: skip
    return GeneratorEnsemble(members)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed training steps per design")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--gen-images", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.batch, a.gen_images, a.repeats = 1, 8, 16, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [bench(name, a.steps, a.batch, a.gen_images, a.repeats) for name in CONFIGS]
    print(f"threads {torch.get_num_threads()}, batch {a.batch}, {a.steps} timed steps, {a.gen_images} images generated")
    print(f"{'design':8s} {'G params':>10s} {'D params':>10s} {'train img/s':>12s} {'step s':>8s} {'gen img/s':>10s}")
    for r in rows:
        print(
            f"{r['arch']:8s} {r['generator_params']:10,d} {r['discriminator_params']:10,d} "
            f"{r['train_images_per_s']:12.1f} {r['train_step_s']:8.3f} {r['generate_images_per_s']:10.0f}"
        )
    torch.manual_seed(0)
    pool = shipped_pool(64 if a.smoke else 10_000)
    pool_ips = generate_speed(pool, pool.members[0].cfg.z_dim, a.gen_images, a.repeats)
    print(f"{'pool of 3':8s} {'':>43s} {pool_ips:10.0f}   (gan + 2 IC-GANs: the README's model)")
    ratio = {
        "train_dcgan_over_mlp": rows[0]["train_images_per_s"] / rows[1]["train_images_per_s"],
        "generate_dcgan_over_mlp": rows[0]["generate_images_per_s"] / rows[1]["generate_images_per_s"],
        "generate_pool3_over_dcgan": pool_ips / rows[0]["generate_images_per_s"],
    }
    train_r, gen_r = ratio["train_dcgan_over_mlp"], ratio["generate_dcgan_over_mlp"]
    print(f"ratio dcgan/mlp: training {train_r:.3f}, generation {gen_r:.3f}")
    print(f"ratio pool of 3 / one dcgan generator: generation {ratio['generate_pool3_over_dcgan']:.3f}")
    result = {"rows": rows, "pool3_generate_images_per_s": pool_ips, "ratio": ratio,
              "threads": torch.get_num_threads(), "batch": a.batch}  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
