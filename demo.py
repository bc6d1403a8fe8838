"""
The whole LDMAE pipeline on the built-in dataset, on a laptop CPU, in about ten minutes:

1. train a small VMAE on 32-px images of ten classes of shapes: masked pre-training, then the decoder
   alone fine-tuned on whole images, as the paper's stages 1 and 3 (configs/vmae_small*.py)
2. encode the images into latents and train a small DiT on them (train_dit.py configs/dit_small.py)
3. sample a labelled grid of every class (sample.py)
4. measure the VMAE's reconstructions of held-out images (evaluate.py: PSNR, SSIM) against the
   simplest compressor of the same size: a bicubic thumbnail with no more numbers than the latent
5. check that the samples show the shape of the class they were asked for, with a small classifier
   trained on real built-in images with their colours scrambled (every class has its own hue, so a
   classifier that saw colour would pass blobs of the right colour); its accuracy on real held-out
   images is printed beside it

$ python demo.py                 # everything goes to out/demo; run it again to resume or re-print
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
import sample
import train_dit
import train_vmae

OUT = 'out/demo'
NUM_HELD_OUT = 2000     # built-in validation images for the reconstructions
NUM_SAMPLES = 500       # for the recognition rate, 50 per class
SAMPLE_STEPS = 50       # Euler steps (the paper: 250; on these tiny latents 50 is plenty)
CFG_SCALE = 4.0


def main():
    t0 = time.time()
    torch.manual_seed(0)
    stage1_ckpt, vmae_ckpt = os.path.join(OUT, 'vmae_stage1', 'last.pt'), os.path.join(OUT, 'vmae', 'last.pt')
    dit_ckpt = os.path.join(OUT, 'dit', 'last.pt')
    common.run_stage("1/5 train the VMAE: masked pre-training", train_vmae, ['configs/vmae_small.py', '--out_dir', os.path.dirname(stage1_ckpt)])
    common.run_stage("1/5 train the VMAE: decoder fine-tuning", train_vmae,
          ['configs/vmae_small_stage3.py', '--init_from', stage1_ckpt, '--out_dir', os.path.dirname(vmae_ckpt)])
    common.run_stage("2/5 extract latents and train the DiT", train_dit,
          ['configs/dit_small.py', '--autoencoder', vmae_ckpt, '--out_dir', os.path.dirname(dit_ckpt)])

    print("\n== 3/5 sample every class ==")
    grid = os.path.join(OUT, 'samples.png')
    flags = ['--dit', dit_ckpt, '--steps', str(SAMPLE_STEPS), '--cfg_scale', str(CFG_SCALE), '--device', 'cpu']
    print(f"$ python sample.py {' '.join(flags)} --class {' '.join(map(str, range(10)))} --n 8 --out {grid}")
    sample.main(sample.parse_args(flags + ['--class', *map(str, range(10)), '--n', '8', '--out', grid]))

    print("\n== 4/5 reconstructions of held-out images, against a thumbnail of the latent's size ==")
    recon = {}
    for name, ckpt in (('stage 1', stage1_ckpt), ('stage 3', vmae_ckpt)):
        flags = ['--autoencoder', ckpt, '--data', 'builtin', '--num_images', str(NUM_HELD_OUT), '--rfid', 'false', '--lpips', 'false',
                 '--num_workers', '0']
        print(f"$ python evaluate.py recon {' '.join(flags)}")
        evaluate.main(['recon', *flags])
        with open(ckpt + '.recon.json') as f:
            recon[name] = next(iter(json.load(f)['autoencoders'].values()))
    after, before, thumbnail = recon['stage 3'], recon['stage 1'], recon['stage 3']['thumbnail']
    latent_numbers = 3 * thumbnail['side'] ** 2

    print("\n== 5/5 do the samples show the shape of their class? ==")
    flags = ['--dit', dit_ckpt, '--data', 'builtin', '--num_samples', str(NUM_SAMPLES), '--steps', str(SAMPLE_STEPS),
             '--cfg_scale', str(CFG_SCALE), '--device', 'cpu']
    print(f"$ python -m paper recognition {' '.join(flags)}")
    paper_commands.main(['recognition', *flags])
    with open(dit_ckpt + '.recognition.json') as f:
        rates = json.load(f)

    minutes, seconds = divmod(int(time.time() - t0), 60)
    print(f"""
== LDMAE demo: results ({minutes}m{seconds:02d}s) ==
VMAE reconstructions of {NUM_HELD_OUT} held-out images: PSNR {after['psnr']:.2f} dB, SSIM {after['ssim']:.3f} ({after['latent_numbers']} latent numbers)
    a bicubic {thumbnail['side']}x{thumbnail['side']} thumbnail ({latent_numbers} numbers) of the same images: PSNR {thumbnail['psnr']:.2f} dB, SSIM {thumbnail['ssim']:.3f}
    the VMAE beats it by {after['psnr'] - thumbnail['psnr']:+.2f} dB PSNR and {after['ssim'] - thumbnail['ssim']:+.3f} SSIM; after masked pre-training
    alone (before the decoder's fine-tuning) it reached PSNR {before['psnr']:.2f} dB, SSIM {before['ssim']:.3f}
    originals vs reconstructions: {latest(os.path.dirname(vmae_ckpt), 'recon_')}
DiT samples whose shape a colour-blind classifier names as their class: {100 * rates['samples_mean']:.1f}% of {NUM_SAMPLES}
    ({SAMPLE_STEPS} Euler steps, cfg {CFG_SCALE}); the same classifier on real held-out images: {100 * rates['real_mean']:.1f}%,
    so the samples are recognised {100 * rates['samples_mean'] / rates['real_mean']:.0f}% as often as real images; the VMAE's
    reconstructions of those real images: {100 * rates['reconstructions_mean']:.1f}%
    a grid of every class: {grid}
checkpoints: {stage1_ckpt}, {vmae_ckpt}, {dit_ckpt}""")


def parse_args(argv=None):
    """No options: --help prints this file's docstring, and anything else is refused before a long run starts."""
    return argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)


def latest(folder, prefix):
    return os.path.join(folder, sorted(f for f in os.listdir(folder) if f.startswith(prefix))[-1])


if __name__ == '__main__':
    parse_args()
    with common.clear_errors():
        main()
