"""
Where does the VMAE's latent smoothness come from? Its recipe taken apart on the built-in shapes, at the small
study's scale and seeds, in about 26 minutes on a 2-core CPU.

The small study (python -m paper.study) finds the VMAE's reconstructions the least robust to latent noise
(Fig. 6), against the paper. Each variant below changes one thing; every setting was fixed before any of
them was run, and none is tuned:

  stage1          configs/vmae_small.py: masked training (25%), posterior samples decoded, KL on the variance
  decoder         stage1 + configs/vmae_small_stage3.py: the decoder fine-tuned on posterior means, the
                  encoder frozen (this project's stage 3, the demo's VMAE)
  authors         the same stage 3 with --train_encoder true: encoder and decoder trained (the authors' code)
  noisy           the same stage 3 with --latent_noise 0.3: the decoder fine-tuned on means perturbed as the
                  test perturbs them, eps ~ U(0, 0.3) per image
  no_mask_stage1  stage 1 with --mask_ratio 0 --visible_weight 1 (the same total MSE weight); no_mask: + stage 3
  no_kl_stage1    stage 1 with --kl_weight 0; no_kl: + stage 3
  ae              paper/configs/ae_small.py: the plain convolutional autoencoder, for reference

For each: Fig. 6 (PSNR and SSIM of 500 held-out images decoded from latents + eps x each channel's std x noise,
and again with one isotropic std for all channels), sigma^2 and rho (Fig. 7), the posterior's std in units of
the test's eps, and the shape judge's rate for reconstructions of 2000 held-out images. Two DiTs
(configs/dit_small.py): one on the latents of stage1's encoder, which decoder, noisy and stage1 share (their
encoders are checked to be identical, so one DiT's samples are decoded by each of their decoders), and one on
the authors variant's. The judge names 500 samples of each (50 Euler steps, cfg 4).

$ python -m paper.ablation      # everything goes to out/ablation; run it again to resume or re-print
Each stage prints the command that does it on its own.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

import common
import dit
import fileio
import paper.__main__ as paper_commands
import train_dit
import train_vmae
import vmae
from autoencoders import load_autoencoder, load_generator
from data import BuiltinShapes
from paper import train_convae
from paper.figures import plot_channel_stds, plot_smoothness
from paper.judges import class_rates, decode_latents, labelled_images, reconstructions, sample_latents, train_classifier
from paper.study import analyse, builtin_flags

OUT = 'out/ablation'
STAGE3 = 'configs/vmae_small_stage3.py'
STAGE1_VARIANTS = {  # name: flags on configs/vmae_small.py
    'stage1': [],
    'no_mask_stage1': ['--mask_ratio', '0', '--visible_weight', '1'],
    'no_kl_stage1': ['--kl_weight', '0'],
}
STAGE3_VARIANTS = {  # name: (the stage-1 run it starts from, flags on configs/vmae_small_stage3.py)
    'decoder': ('stage1', []),
    'authors': ('stage1', ['--train_encoder', 'true']),
    'noisy': ('stage1', ['--latent_noise', '0.3']),
    'no_mask': ('no_mask_stage1', []),
    'no_kl': ('no_kl_stage1', []),
}
ORDER = ['stage1', 'decoder', 'authors', 'noisy', 'no_mask_stage1', 'no_mask', 'no_kl_stage1', 'no_kl', 'ae']
DITS = {'dit_shared': ('decoder', ['stage1', 'decoder', 'noisy']), 'dit_authors': ('authors', ['authors'])}  # trained on, decodes for
NUM_SMOOTHNESS = 500     # held-out images for Fig. 6 (six perturbations each), as the study
NUM_SEGMENTED = 500      # for sigma^2 and rho, as the study
NUM_HELD_OUT = 200       # per class, for the judge's bar and the reconstructions (2000 images), as the demo
NUM_SAMPLES = 500        # per DiT, 50 per class


def main():
    t0 = time.time()
    torch.manual_seed(0)
    checkpoints = train_all()
    names = list(checkpoints)
    flags = builtin_flags(checkpoints)
    offline = ['--rfid', 'false', '--lpips', 'false', '--num_workers', '0', '--num_images', str(NUM_SMOOTHNESS)]
    out = {name: os.path.join(OUT, f'{name}.json') for name in ('smoothness', 'isotropic', 'compression', 'judge')}
    analyse("Fig. 6: reconstructions from latents + eps x each channel's std", 'smoothness', flags + offline, out['smoothness'])
    analyse("Fig. 6 with one isotropic std for all channels", 'smoothness', flags + offline + ['--noise', 'isotropic'], out['isotropic'])
    analyse("Fig. 7: sigma^2 and rho on the shapes' masks", 'compression',
            flags + ['--masks', 'builtin', '--num_images', str(NUM_SEGMENTED)], out['compression'])
    print("\n== the shape judge: reconstructions of held-out images, and DiT samples ==")
    write(out['judge'], judge_all(checkpoints))
    summary = summarise(out, checkpoints)
    write(os.path.join(OUT, 'ablation.json'), summary)
    smoothness = json.load(open(out['smoothness']))['autoencoders']
    figure = plot_smoothness({n: {float(e): m for e, m in smoothness[n]['eps'].items()} for n in names},
                             os.path.join(OUT, 'fig6.png'), change=True)
    stds = one_line_per_encoder({n: smoothness[n]['latent_std'] for n in names})
    channels = plot_channel_stds(stds, os.path.join(OUT, 'channels.png'))
    report(summary, figure, channels, time.time() - t0)


def parse_args(argv=None):
    """No options: --help prints this file's docstring, and anything else is refused before a long run starts."""
    return argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)


def train_all():
    """The nine autoencoders and two DiTs, resumed or skipped when an earlier run got there. -> {name: checkpoint}"""
    path = lambda name: os.path.join(OUT, name, 'last.pt')
    for name, flags in STAGE1_VARIANTS.items():
        common.run_stage(f"train {name}: masked pre-training", train_vmae, ['configs/vmae_small.py', *flags, '--out_dir', os.path.dirname(path(name))])
    for name, (start, flags) in STAGE3_VARIANTS.items():
        common.run_stage(f"train {name}: stage 3 from {start}", train_vmae,
                         [STAGE3, *flags, '--init_from', path(start), '--out_dir', os.path.dirname(path(name))])
    common.run_stage("train the AE for reference", train_convae, ['paper/configs/ae_small.py', '--out_dir', os.path.dirname(path('ae'))])
    for name, (autoencoder, _) in DITS.items():
        common.run_stage(f"train a DiT on the latents of {autoencoder}", train_dit,
                         ['configs/dit_small.py', '--autoencoder', path(autoencoder), '--out_dir', os.path.dirname(path(name))])
    return {name: path(name) for name in ORDER}


def write(path, results):
    fileio.write_json(path, {**results, 'torch': torch.__version__})
    print(f"wrote {path}")


def one_line_per_encoder(stds):
    """Variants that share an encoder share their channels' stds: one line for each, named after all of them."""
    groups = {}
    for name, std in stds.items():
        groups.setdefault(tuple(std), []).append(name)
    return {' = '.join(names): list(std) for std, names in groups.items()}


def same_encoder(a, b):
    """Whether two VMAEs hold the same encoder weights and position table, and so make the same latents."""
    tensors = lambda m: [t for part in m.encoder_modules() for t in part.state_dict().values()] + [m.pos_embed]
    ta, tb = tensors(a), tensors(b)
    return len(ta) == len(tb) and all(map(torch.equal, ta, tb))


def judge_all(checkpoints):
    """The colour-blind shape judge of the demo, trained once: its rate on real held-out images (the bar), on
    each autoencoder's reconstructions of them, and on each DiT's samples decoded by each decoder that shares
    its encoder. -> {'real', 'reconstructions': {name: rate}, 'samples': {name: rate}}"""
    defaults = paper_commands.RecognitionConfig()
    classifier = train_classifier(BuiltinShapes(32, flip=True), colour_blind=True)
    images, labels = labelled_images(BuiltinShapes(32, split='val', per_class=NUM_HELD_OUT))
    mean = lambda rates: float(np.mean(rates))
    results = {'real': mean(class_rates(classifier, images, labels, 10)), 'reconstructions': {}, 'samples': {}}
    autoencoders = {name: load_autoencoder(path, 'cpu') for name, path in checkpoints.items()}
    for name, autoencoder in autoencoders.items():
        results['reconstructions'][name] = mean(class_rates(classifier, reconstructions(autoencoder, images), labels, 10))
    for dit_name, (trained_on, decoders) in DITS.items():
        model, stats, own = load_generator(os.path.join(OUT, dit_name, 'last.pt'), device='cpu')
        noise = common.seeded_noise(defaults.seed, range(NUM_SAMPLES), (model.in_channels, own.grid, own.grid))
        sample_labels = torch.arange(NUM_SAMPLES) % model.num_classes
        latents = sample_latents(model, noise, sample_labels, defaults.batch_size, defaults.solver, steps=defaults.steps,
                                 shift=defaults.shift, cfg_scale=dit.guidance_scale(model, None), cfg_interval_start=defaults.cfg_interval_start)
        for name in decoders:
            if not same_encoder(own, autoencoders[name]):
                raise ValueError(f"{name}'s encoder is not {trained_on}'s: the DiT {dit_name} does not model its latents")
            samples = decode_latents(autoencoders[name], latents, stats, defaults.batch_size)
            results['samples'][name] = mean(class_rates(classifier, samples, sample_labels, model.num_classes))
        print(f"{dit_name} (on {trained_on}'s latents): samples recognised, decoded by " +
              ', '.join(f"{n} {100 * results['samples'][n]:.1f}%" for n in decoders))
    return results


@torch.no_grad()
def posterior_eps(autoencoder, images, latent_std):
    """The posterior's median std over the images' latent tokens, in units of each channel's latent std:
    the eps of the smoothness test that decoding posterior samples instead of means amounts to."""
    std = autoencoder.encode(images).std / torch.tensor(latent_std).view(1, -1, 1, 1)
    return float(std.median())


def summarise(out, checkpoints):
    """One row per variant from the analyses' JSONs. -> {'variants': {name: row}, 'real': the judge's bar, 'eps': [...]}"""
    smoothness, isotropic, compression, judge = (json.load(open(out[k])) for k in ('smoothness', 'isotropic', 'compression', 'judge'))
    held_out, _ = labelled_images(BuiltinShapes(32, split='val', per_class=NUM_SMOOTHNESS // 10))
    rows = {}
    for name in checkpoints:
        curve = {float(e): m for e, m in smoothness['autoencoders'][name]['eps'].items()}
        flat = {float(e): m for e, m in isotropic['autoencoders'][name]['eps'].items()}
        perturbed = [e for e in curve if e > 0]
        change = lambda c, k: float(np.mean([c[e][k] - c[0.0][k] for e in perturbed]))
        std = smoothness['autoencoders'][name]['latent_std']
        share = sorted((s * s for s in std), reverse=True)
        autoencoder = load_autoencoder(checkpoints[name], 'cpu')
        rows[name] = {
            'psnr': {f'{e:g}': curve[e]['psnr'] for e in curve}, 'ssim': {f'{e:g}': curve[e]['ssim'] for e in curve},
            'psnr_change': change(curve, 'psnr'), 'ssim_change': change(curve, 'ssim'),
            'psnr_change_isotropic': change(flat, 'psnr'), 'psnr_change_at_max': curve[max(perturbed)]['psnr'] - curve[0.0]['psnr'],
            'sigma2': compression['autoencoders'][name]['sigma2'], 'rho': compression['autoencoders'][name]['rho'],
            'top3_variance_share': sum(share[:3]) / sum(share), 'std_max_over_min': max(std) / min(std),
            'posterior_eps': posterior_eps(autoencoder, held_out, std) if isinstance(autoencoder, vmae.VMAE) else None,
            'reconstructions_recognised': judge['reconstructions'][name], 'samples_recognised': judge['samples'].get(name),
        }
    return {'variants': rows, 'real_recognised': judge['real'], 'eps': sorted(curve)}


def report(summary, figure, channels, seconds):
    rows, eps = summary['variants'], summary['eps']
    pct = lambda v: '-' if v is None else f'{100 * v:.1f}%'
    print(f"\n== where the smoothness comes from ({int(seconds) // 60}m{int(seconds) % 60:02d}s) ==")
    print("PSNR (dB) and SSIM of held-out reconstructions from latents + eps x each channel's std x N(0, I):")
    print(f"{'':16}" + ''.join(f'{e:>7g}' for e in eps) + ' |' + ''.join(f'{e:>7g}' for e in eps))
    for name, r in rows.items():
        print(f"{name:16}" + ''.join(f"{r['psnr'][f'{e:g}']:7.2f}" for e in eps) + ' |' + ''.join(f"{r['ssim'][f'{e:g}']:7.3f}" for e in eps))
    print(f"\n{'':16}{'dPSNR':>7}{'@max':>7}{'dSSIM':>8}{'iso':>7}{'top3':>6}{'sigma^2':>8}{'rho':>6}{'post.':>8}{'recon':>7}{'samples':>8}")
    for name, r in rows.items():
        post = '-' if r['posterior_eps'] is None else f"{r['posterior_eps']:.1e}"
        print(f"{name:16}{r['psnr_change']:7.2f}{r['psnr_change_at_max']:7.2f}{r['ssim_change']:8.3f}{r['psnr_change_isotropic']:7.2f}"
              f"{r['top3_variance_share']:6.2f}{r['sigma2']:8.3f}{r['rho']:6.3f}{post:>8}{pct(r['reconstructions_recognised']):>7}"
              f"{pct(r['samples_recognised']):>8}")
    print(f"""
dPSNR, dSSIM: mean change from eps 0 over eps = {', '.join(f'{e:g}' for e in eps if e > 0)}; @max: at eps {max(eps):g};
iso: dPSNR with one std for all channels (their RMS, the same noise energy); top3: the share of the latent
variance in the three largest channels; post.: the posterior's median std in units of eps; recon, samples: the
shape judge's rate (real held-out images: {pct(summary['real_recognised'])})
figures: {figure}, {channels}""")


if __name__ == '__main__':
    parse_args()
    with common.clear_errors():
        main()
