"""
The whole LDMAE pipeline on the built-in dataset, on a laptop CPU, in about ten minutes:

1. train a small VMAE on 32-px images of ten classes of shapes (train_vmae.py configs/vmae_small.py)
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

import math
import os
import time

import torch

import analyses
import common
import data
import evaluate
import metrics
import sample
import train_dit
import train_vmae
import vmae

OUT = 'out/demo'
SAMPLES_PER_CLASS = 50  # for the recognition rate
SAMPLE_STEPS = 50       # Euler steps (the paper: 250; on these tiny latents 50 is plenty)
CFG_SCALE = 4.0


def main():
    t0 = time.time()
    torch.manual_seed(0)
    vmae_ckpt, dit_ckpt = os.path.join(OUT, 'vmae', 'last.pt'), os.path.join(OUT, 'dit', 'last.pt')
    stage("1/5 train the VMAE", train_vmae, ['configs/vmae_small.py', '--out_dir', os.path.dirname(vmae_ckpt)])
    stage("2/5 extract latents and train the DiT", train_dit,
          ['configs/dit_small.py', '--vmae', vmae_ckpt, '--out_dir', os.path.dirname(dit_ckpt)])

    print("\n== 3/5 sample every class ==")
    grid = os.path.join(OUT, 'samples.png')
    flags = ['--dit', dit_ckpt, '--steps', str(SAMPLE_STEPS), '--cfg_scale', str(CFG_SCALE), '--device', 'cpu']
    print(f"$ python sample.py {' '.join(flags)} --class {' '.join(map(str, range(10)))} --n 8 --out {grid}")
    sample.main(sample.parse_args(flags + ['--class', *map(str, range(10)), '--n', '8', '--out', grid]))
    samples, labels = generate_for_recognition(flags)

    print("\n== 4/5 reconstructions of held-out images ==")
    print(f"$ python evaluate.py recon --vmae {vmae_ckpt} --data builtin --no_rfid --no_lpips")
    model = vmae.load_vmae(vmae_ckpt)
    held_out = data.BuiltinShapes(32, split='val', per_class=200)
    recon = evaluate.evaluate_reconstruction(model, held_out, common.Dist(), batch_size=250, num_workers=0)[0.0]
    real_images, real_labels = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in held_out]))
    originals = data.to_uint8(real_images).numpy()
    side = math.isqrt(model.latent_dim * model.grid ** 2 // 3)  # the largest thumbnail with no more numbers than the latent
    thumbnails = analyses.thumbnail_reconstruction(originals, side)
    thumb_psnr, thumb_ssim = metrics.psnr_per_image(originals, thumbnails).mean(), metrics.ssim_per_image(originals, thumbnails).mean()

    print("\n== 5/5 do the samples show the shape of their class? ==")
    classifier = analyses.train_shape_classifier(data.BuiltinShapes(32, split='train', flip=True))
    real_rate = analyses.recognition_rate(classifier, real_images, real_labels)
    sample_rate = analyses.recognition_rate(classifier, samples, labels)

    minutes, seconds = divmod(int(time.time() - t0), 60)
    latent_numbers = model.latent_dim * model.grid ** 2
    print(f"""
== LDMAE demo: results ({minutes}m{seconds:02d}s) ==
VMAE reconstructions of {len(held_out)} held-out images: PSNR {recon['psnr']:.2f} dB, SSIM {recon['ssim']:.3f} ({latent_numbers} latent numbers)
    a bicubic {side}x{side} thumbnail ({3 * side * side} numbers) of the same images: PSNR {thumb_psnr:.2f} dB, SSIM {thumb_ssim:.3f}
    originals vs reconstructions: {latest(os.path.dirname(vmae_ckpt), 'recon_')}
DiT samples whose shape a colour-blind classifier names as their class: {100 * sample_rate:.1f}% of {len(labels)}
    ({SAMPLE_STEPS} Euler steps, cfg {CFG_SCALE}); the same classifier on real held-out images: {100 * real_rate:.1f}%
    a grid of every class: {grid}
checkpoints: {vmae_ckpt}, {dit_ckpt}""")


def stage(title, script, flags):
    """Run a training script with its config file, resuming (or skipping) what an earlier run finished."""
    print(f"\n== {title} ==")
    out_dir = flags[flags.index('--out_dir') + 1]
    if os.path.isfile(os.path.join(out_dir, 'last.pt')):
        flags = flags + ['--resume']
    print(f"$ python {script.__name__}.py {' '.join(flags)}")
    script.main(common.parse_config(script.Config, flags))


def generate_for_recognition(flags):
    """SAMPLES_PER_CLASS samples of every class, from noise the grid does not use."""
    args = sample.parse_args(flags + ['--seed', '1'])
    model, stats, vae, _ = sample.load_models(args, torch.device('cpu'))
    labels = torch.arange(10).repeat_interleave(SAMPLES_PER_CLASS)
    images = torch.cat([sample.generate(model, vae, stats, labels[i:i + 250].tolist(), range(i, i + 250), args, 'cpu')
                        for i in range(0, len(labels), 250)])
    return images.clamp(-1, 1), labels


def latest(folder, prefix):
    return os.path.join(folder, sorted(f for f in os.listdir(folder) if f.startswith(prefix))[-1])


if __name__ == '__main__':
    with common.clear_errors():
        main()
