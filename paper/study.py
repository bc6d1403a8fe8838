"""
The paper's comparison of autoencoders (section 5) at small scale, on a laptop CPU in about half an hour:

1. train five small autoencoders on the built-in shapes at 32 px: the VMAE (masked pre-training, then
   the decoder fine-tuned, as in the demo) and the convolutional AE, DAE, VAE and SD-VAE of
   paper/configs/{ae,dae,vae,sdvae}_small.py (LPIPS off: its VGG16 weights are a download)
2. Table 1: their reconstructions of 2000 held-out images (evaluate.py recon)
3. Fig. 6: reconstructions from perturbed latents (python -m paper smoothness)
4. Fig. 7: sigma^2 and rho of their latent tokens and of the raw image, on the shapes' exact masks
   (python -m paper compression), with Fig. 8's projections and Fig. 4's k-means maps
5. Fig. 2: the radar of the three properties
and then which of the paper's orderings hold here. Nothing is tuned to make them hold.

$ python -m paper.study                # everything goes to out/study; run it again to resume or re-print
Each stage prints the command that does it on its own.
"""

import argparse
import json
import os
import time

import torch

import common
import evaluate
import paper.__main__ as paper_commands
import train_vmae
from paper import train_convae

OUT = 'out/study'
BASELINES = ('ae', 'dae', 'vae', 'sdvae')   # paper/configs/<name>_small.py
NUM_HELD_OUT = 2000                         # built-in validation images for Table 1
NUM_SMOOTHNESS = 500                        # for Fig. 6 (six latent perturbations each)
NUM_SEGMENTED = 500                         # for Figs. 7 and 8


def main():
    t0 = time.time()
    torch.manual_seed(0)
    checkpoints = train_all()
    flags = builtin_flags(checkpoints)
    offline = ['--rfid', 'false', '--lpips', 'false', '--num_workers', '0']
    out = {name: os.path.join(OUT, f'{name}.json') for name in ('recon', 'smoothness', 'compression', 'projection', 'kmeans', 'radar')}
    analyse("Table 1: reconstructions of held-out images", 'recon', flags + offline + ['--num_images', str(NUM_HELD_OUT)], out['recon'])
    analyse("Fig. 6: reconstructions from perturbed latents", 'smoothness', flags + offline + ['--num_images', str(NUM_SMOOTHNESS)],
            out['smoothness'])
    segmented = flags + ['--masks', 'builtin', '--num_images', str(NUM_SEGMENTED)]
    analyse("Fig. 7: perceptual compression on the shapes' masks", 'compression', segmented, out['compression'])
    analyse("Fig. 8: one image's latent tokens", 'projection', segmented + ['--image', '7'], out['projection'])
    analyse("Fig. 4: k-means maps of the latent tokens", 'kmeans', flags + ['--images', '2', '7'], out['kmeans'])
    analyse("Fig. 2: the radar", 'radar', ['--recon', out['recon'], '--smoothness', out['smoothness'],
                                         '--compression', out['compression']], out['radar'])
    report(out, time.time() - t0)


def parse_args(argv=None):
    """No options: --help prints this file's docstring, and anything else is refused before a long run starts."""
    return argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)


def train_all():
    """The five small autoencoders, resumed or skipped when an earlier run got there. -> {name: checkpoint}"""
    stage1, vmae = os.path.join(OUT, 'vmae_stage1'), os.path.join(OUT, 'vmae')
    common.run_stage("train the VMAE: masked pre-training", train_vmae, ['configs/vmae_small.py', '--out_dir', stage1])
    common.run_stage("train the VMAE: decoder fine-tuning", train_vmae,
                     ['configs/vmae_small_stage3.py', '--init_from', os.path.join(stage1, 'last.pt'), '--out_dir', vmae])
    checkpoints = {'vmae': os.path.join(vmae, 'last.pt')}
    for name in BASELINES:
        folder = os.path.join(OUT, name)
        common.run_stage(f"train the {name.upper()} baseline", train_convae, [f'paper/configs/{name}_small.py', '--out_dir', folder])
        checkpoints[name] = os.path.join(folder, 'last.pt')
    return checkpoints


def builtin_flags(checkpoints):
    """What every analysis here is given: the autoencoders by name, the built-in shapes, the CPU."""
    return ['--autoencoder', *checkpoints.values(), '--names', *checkpoints, '--data', 'builtin', '--device', 'cpu']


def analyse(title, command, flags, out):
    """Table 1 with evaluate.py recon, the rest with the wing's commands."""
    print(f"\n== {title} ==")
    script = 'evaluate.py' if command == 'recon' else '-m paper'
    print(f"$ python {script} {command} {' '.join(flags)} --out {out}")
    (evaluate.main if command == 'recon' else paper_commands.main)([command, *flags, '--out', out])


def paper_orderings(recon, smoothness, compression, radar):
    """The paper's findings that the offline metrics here can test, each -> (claim, holds here?)."""
    psnr = {n: r['psnr'] for n, r in recon.items()}
    robust = radar['scores']['smoothness']
    curves = {n: c['eps'] for n, c in smoothness['autoencoders'].items()}
    points = compression['autoencoders']
    sigma2, rho = {n: p['sigma2'] for n, p in points.items()}, {n: p['rho'] for n, p in points.items()}
    raw = compression['pixel']['sigma2']
    return [
        ("Table 1: PSNR ranks AE > VMAE > DAE > SD-VAE > VAE", sorted(psnr, key=psnr.get, reverse=True) == ['ae', 'vmae', 'dae', 'sdvae', 'vae']),
        ("Table 1: the VAE reconstructs worst (PSNR)", min(psnr, key=psnr.get) == 'vae'),
        ("Fig. 6: the probabilistic VAE, SD-VAE and VMAE are all more robust to latent noise than AE and DAE",
         min(robust[n] for n in ('vae', 'sdvae', 'vmae')) > max(robust[n] for n in ('ae', 'dae'))),
        ("Fig. 6: the VAE is the most robust", max(robust, key=robust.get) == 'vae'),
        ("Fig. 6: the VMAE reconstructs better than SD-VAE at every noise level (PSNR)",
         all(curves['vmae'][e]['psnr'] > curves['sdvae'][e]['psnr'] for e in curves['vmae'])),
        ("Fig. 7: DAE and VAE have a larger sigma^2 than the raw image", min(sigma2['dae'], sigma2['vae']) > raw),
        ("Fig. 7: AE, SD-VAE and VMAE have a smaller sigma^2 than the raw image", max(sigma2[n] for n in ('ae', 'sdvae', 'vmae')) < raw),
        ("Fig. 7: SD-VAE has the lowest sigma^2 and the lowest rho", min(sigma2, key=sigma2.get) == 'sdvae' and min(rho, key=rho.get) == 'sdvae'),
        ("Fig. 7: the VMAE has the highest rho", max(rho, key=rho.get) == 'vmae'),
    ]


def report(out, seconds):
    read = lambda name: json.load(open(out[name]))
    recon, smoothness, compression, radar = (read(n) for n in ('recon', 'smoothness', 'compression', 'radar'))
    rows = recon['autoencoders']
    print(f"\n== the five autoencoders ({int(seconds) // 60}m{int(seconds) % 60:02d}s) ==")
    print(f"{'':8}{'PSNR':>8}{'SSIM':>8}{'smooth':>9}{'sigma^2':>9}{'rho':>7}")
    for name, r in rows.items():
        c = compression['autoencoders'][name]
        print(f"{name:8}{r['psnr']:8.2f}{r['ssim']:8.3f}{radar['scores']['smoothness'][name]:9.2f}{c['sigma2']:9.3f}{c['rho']:7.3f}")
    thumb, pixel = next(iter(rows.values()))['thumbnail'], compression['pixel']
    print(f"{'9x9 thumbnail':14}{thumb['psnr']:.2f} dB, SSIM {thumb['ssim']:.3f}; raw image: sigma^2 {pixel['sigma2']:.3f}, rho {pixel['rho']:.3f}")
    print("(smooth: mean PSNR change, dB, from latents perturbed by eps = 0.01 ... 0.3 latent stds)")
    print("\nThe paper's orderings, here:")
    for claim, holds in paper_orderings(rows, smoothness, compression, radar):
        print(f"  {'holds' if holds else 'does not hold':>13}: {claim}")
    print(f"\npictures: {', '.join(os.path.splitext(out[n])[0] + '.png' for n in ('smoothness', 'compression', 'projection', 'kmeans', 'radar'))}")


if __name__ == '__main__':
    parse_args()
    with common.clear_errors():
        main()
