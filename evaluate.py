"""
Evaluation: ADM-compatible FID / sFID / IS / precision / recall in plain PyTorch, reconstruction metrics
of any autoencoders (VMAEs or convolutional baselines, several at once), and the paper's latent
analyses (section 5), each a JSON with its figure beside it.

Generation metrics reproduce OpenAI's guided-diffusion evaluator (TensorFlow) without TensorFlow: the
FID Inception-v3 of the TF graph (inception.py), its inputs and cached features (adm.py) and the metrics
as ADM defines them (metrics.py). Statistics are float64 and TF32 is off while features are computed, so
the numbers do not depend on the GPU generation. analyses.py computes the section-5 analyses and
figures.py draws them; this file runs the commands.

Usage:
    python evaluate.py fid VIRTUAL_imagenet256_labeled.npz samples.npz  # FID, sFID, IS, precision, recall
    torchrun --nproc_per_node 8 evaluate.py fid REF.npz samples.npz     # Inception features sharded over GPUs
    python evaluate.py fid ref_images/ sample_images/ --image_size 256  # folders (ADM centre crop to 256)
    python evaluate.py recon --autoencoder vmae.pt sdvae.pt --data imagenet/val   # Table 1: L1, MSE, PSNR, SSIM, LPIPS, rFID
    python evaluate.py recon --autoencoder ae.pt --data builtin --no_rfid --no_lpips   # offline, no weights
    python evaluate.py smoothness --autoencoder vmae.pt sdvae.pt --data imagenet/val   # Fig. 6
    python evaluate.py compression --autoencoder vmae.pt sdvae.pt --data ADE/images --masks ADE/annotations  # Fig. 7
    python evaluate.py projection --autoencoder vmae.pt sdvae.pt --data ADE/images --masks ADE/annotations   # Fig. 8
    python evaluate.py kmeans --autoencoder vmae.pt sdvae.pt --data imagenet/val --images 0 7    # Fig. 4
    python evaluate.py radar --recon analysis/recon.json --smoothness analysis/smoothness.json \
        --compression analysis/compression.json                         # Fig. 2
    python evaluate.py solvers --dit dit.pt                             # Euler vs Heun against a fine reference
    python evaluate.py recognition --dit dit.pt --data builtin          # do samples show their class?
`python evaluate.py REF SAMPLES` (without `fid`) also works. Inception weights: --inception PATH,
else the torch hub cache (downloaded there when online).
"""

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable

import torch

import common
import dit
import fileio
from adm import evaluate_generation, open_images
from analyses import (SMOOTHNESS_EPS, SegmentationMasks, builtin_masked_images, compression_statistics, evaluate_compression,
                      evaluate_reconstruction, heun_match, kmeans, masked_images, measure_latent_std, project_2d, radar_scores, recognition_study,
                      rescale, shared_patch_size, solver_study, standardise_tokens, thumbnail_side, token_features, train_classifier)
from autoencoders import dit_latent, load_autoencoder, load_generator
from common import print0, seeded_noise
from data import BUILTIN_CLASSES, BuiltinShapes, build_dataset, to_uint8
from dit import read_latent_stats
from figures import plot_compression, plot_kmeans, plot_projection, plot_radar, plot_smoothness, plot_solvers
from inception import FID_WEIGHTS_SHA256_PREFIX, inception_weights_path, load_inception
from metrics import METRIC_LABELS
from vmae import lpips_vgg

#################################################################################
#                                     CLI                                       #
#################################################################################

@dataclasses.dataclass
class FidConfig:
    ref: str = common.positional()      # reference: ADM reference batch .npz (arr_0, optional mu/sigma/mu_s/sigma_s) or image folder
    samples: str = common.positional()  # samples: .npz with arr_0 (uint8 (N, H, W, 3), as sample.py writes) or image folder
    image_size: int = 0                 # centre-crop folder images to this size (ADM crop); npz files are used as they are
    cache: bool = True                  # read and write <input>.inception_stats.npz (--no_cache: neither)
    pr_fp32: bool = False               # float32 precision/recall distances instead of ADM's fp16
    inception: str = ''                 # pt_inception-2015-12-05-6726825d.pth; '': the torch hub cache's, downloaded there when online
    allow_random_inception: bool = False  # accept Inception weights other than the FID file (tests only)
    device: str = 'auto'                # 'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu', 'cuda'
    batch_size: int = 64                # images per Inception forward, per rank
    out: str = ''                       # JSON path; '': <samples>.metrics.json


@dataclasses.dataclass
class AutoencoderConfig:
    autoencoder: tuple[str, ...] = common.aliases((), 'vmae')  # one or more: VMAE or convolutional checkpoints (ours, the authors'), diffusers vae/ folders; required
    names: tuple[str, ...] = ()         # their names in tables and plots; default: the run folder (out/sdvae/last.pt -> sdvae)
    data: str = ''                      # image folder (e.g. ImageNet val), or 'builtin'; required
    image_size: int = 0                 # evaluation size; 0: the first autoencoder's
    num_images: int = 0                 # use only the first N images (0: all)
    device: str = 'auto'                # 'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu', 'cuda'
    batch_size: int = 32                # images per batch, per rank
    out: str = ''                       # JSON path, the PNG beside it; '': next to the checkpoint (one), analysis/<command>.json (several)


@dataclasses.dataclass
class ReconConfig(AutoencoderConfig):
    rfid: bool = True                   # rFID (needs the Inception weights; --no_rfid skips it)
    lpips: bool = True                  # LPIPS (needs torchvision's VGG16 weights; --no_lpips skips it)
    num_workers: int = 4                # data-loading processes per rank
    inception: str = ''                 # pt_inception-2015-12-05-6726825d.pth; '': the torch hub cache's, downloaded there when online
    allow_random_inception: bool = False  # accept Inception weights other than the FID file (tests only)


@dataclasses.dataclass
class SmoothnessConfig(ReconConfig):
    eps: tuple[float, ...] = SMOOTHNESS_EPS  # noise levels, in latent stds
    latent_stats: str = ''              # train_dit.py checkpoint or meta.json, or the authors' latents_stats.pt; '': measure the std
    seed: int = 0                       # the latent noise of image i is drawn from (seed, i)


@dataclasses.dataclass
class CompressionConfig(AutoencoderConfig):
    masks: str = ''                     # label PNGs named like the images (ADE20K), CelebAMask-HQ part masks, or 'builtin' (with --data builtin); required


@dataclasses.dataclass
class ProjectionConfig(CompressionConfig):
    image: int = 0                      # which image (among those with masks) to draw; sigma^2 is over all --num_images


@dataclasses.dataclass
class KmeansConfig(AutoencoderConfig):
    images: tuple[int, ...] = (0, 1, 2, 3)  # indices of the --data images to cluster
    ks: tuple[int, ...] = (2, 3, 4, 8)  # numbers of clusters
    seed: int = 0


@dataclasses.dataclass
class RadarConfig:
    recon: str = ''                     # evaluate.py recon JSON of the autoencoders to compare; required
    smoothness: str = ''                # evaluate.py smoothness JSON of the same autoencoders
    compression: str = ''               # evaluate.py compression JSON of the same autoencoders
    generation: tuple[str, ...] = ()    # name=path: evaluate.py fid JSON of a DiT on each autoencoder's latents
    out: str = ''                       # JSON path, the PNG beside it; '': radar.json beside the recon JSON


@dataclasses.dataclass
class SamplingConfig:
    dit: str = ''                       # train_dit.py checkpoint; required
    autoencoder: str = common.aliases('', 'vmae')  # the autoencoder that decodes its latents; '': the one the DiT was trained on
    num_samples: int = 100              # class-balanced samples (label i % classes), noise from (seed, i)
    cfg_scale: float | None = None      # guidance; default: 4 for class-conditional DiTs, 1 for unconditional ones
    cfg_interval_start: float = 0.1     # no guidance for t below this
    shift: float = 0.3                  # the time grid's shift, as sample.py
    seed: int = 0
    batch_size: int = 250               # samples per DiT batch
    device: str = 'auto'                # 'auto', 'cpu' or 'cuda'
    out: str = ''                       # JSON path; '': next to the DiT checkpoint


@dataclasses.dataclass
class SolversConfig(SamplingConfig):
    latent_stats: str = ''              # for a DiT checkpoint without them (the authors' latents_stats.pt)
    reference_steps: int = 1000         # Heun steps of the reference integration
    cfg_channels: int = 0               # guide only latent channels [0, k); 0 = all


@dataclasses.dataclass
class RecognitionConfig(SamplingConfig):
    data: str = ''                      # real images of its classes to train the judge on: 'builtin' or a folder of class subfolders; required
    held_out: str = ''                  # real images of the same classes the judge never sees, its bar; '': builtin's val split
    num_samples: int = 500              # class-balanced samples (label i % classes), noise from (seed, i)
    steps: int = 50                     # sampler steps (the paper: 250)
    solver: str = 'euler'               # euler or heun
    seed: int = 1                       # noise seed (sample.py's grids use 0)


def format_value(v):
    return 'n/a' if v is None else f'{v:.4f}'


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print('  '.join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))), flush=True)


def write_results(path, obj, cfg, inception=None):
    """The results as JSON, with what produced them: the command's settings, torch, the Inception weights."""
    obj = {**obj, 'config': dataclasses.asdict(cfg), 'torch': torch.__version__}
    if inception is not None:
        obj.update(inception_sha256=inception.sha256, fid_weights=inception.sha256.startswith(FID_WEIGHTS_SHA256_PREFIX))
    fileio.write_json(path, obj)
    print(f"wrote {path}", flush=True)


def load_inception_for(cfg, d):
    path = inception_weights_path(cfg.inception, d.master)
    model = load_inception(path, d.device, cfg.allow_random_inception)
    print0(f"Inception: {path} (sha256 {model.sha256[:16]}...)" + ('' if model.sha256.startswith(FID_WEIGHTS_SHA256_PREFIX) else
                                                                  '  WARNING: not the FID weights, numbers are not comparable'))
    return model


def run_fid(cfg, d):
    ref, samples = open_images(cfg.ref, cfg.image_size), open_images(cfg.samples, cfg.image_size)
    inception = load_inception_for(cfg, d)
    out = evaluate_generation(ref, samples, inception, d, cfg.batch_size, cfg.cache, not cfg.pr_fp32)
    if not d.master:
        return
    results, info = out
    print_table(['metric', 'value'], [[METRIC_LABELS[k], format_value(v)] for k, v in results.items()])
    write_results(output_path(cfg, 'fid'), {**results, **info}, cfg, inception)


def autoencoder_names(cfg):
    """--names, or each checkpoint's run folder (out/sdvae/last.pt -> sdvae), else its file or folder name."""
    if cfg.names:
        if len(cfg.names) != len(cfg.autoencoder):
            raise ValueError(f"--names gives {len(cfg.names)} names for {len(cfg.autoencoder)} autoencoders")
        twice = sorted({n for n in cfg.names if cfg.names.count(n) > 1})
        if twice:  # the names key the results: a repeated one would keep one autoencoder's row and drop the other's
            raise ValueError(f"--names gives {', '.join(repr(n) for n in twice)} more than once: give each autoencoder its own name")
        return list(cfg.names)
    def name(path):
        path = os.path.normpath(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        return os.path.basename(os.path.dirname(path)) or stem if stem == 'last' or stem.startswith('ckpt_') else stem
    names = [name(p) for p in cfg.autoencoder]
    return [n if names.count(n) == 1 else f'{n}_{i}' for i, n in enumerate(names)]


def output_path(cfg, command):
    """--out, else beside the input: the samples (fid), the recon JSON (radar), the DiT (solvers, recognition),
    the checkpoint of a single autoencoder; with several, analysis/<command>.json."""
    if cfg.out:
        return cfg.out
    if command == 'fid':
        return cfg.samples.rstrip('/') + '.metrics.json'
    if command == 'radar':
        return os.path.join(os.path.dirname(cfg.recon), 'radar.json')
    if command in ('solvers', 'recognition'):
        return f'{cfg.dit}.{command}.json'
    if len(cfg.autoencoder) == 1:
        return cfg.autoencoder[0].rstrip('/') + f'.{command}.json'
    return os.path.join('analysis', f'{command}.json')


def plot_path(path):
    """The PNG written beside a command's JSON."""
    return os.path.splitext(path)[0] + '.png'


def check_output_paths(name, cfg):
    """The JSON (and the PNG beside it) must be writable, checked before the evaluation runs."""
    path = output_path(cfg, name)
    fileio.check_output_file(path, '--out' if cfg.out else 'the default output')
    if COMMANDS[name].plots and os.path.isdir(plot_path(path)):
        raise ValueError(f"the plot {plot_path(path)} (beside {path}) is a folder: choose another --out")


def load_autoencoders(cfg, d):
    """-> ({name: autoencoder} in eval mode, their image size): --image_size, else the first one's, for all."""
    models, size = {}, cfg.image_size or None
    for name, path in zip(autoencoder_names(cfg), cfg.autoencoder):
        models[name] = load_autoencoder(path, d.device, size)
        size = models[name].img_size
        print0(f"{name}: {type(models[name]).__name__} {path} at {size} px")
    return models, size


def evaluation_images(cfg, size):
    dataset = build_dataset(cfg.data, size, train=False, split='val')
    if cfg.num_images:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.num_images, len(dataset))))
    print0(f"{len(dataset)} images from {cfg.data} (ADM centre crop"
           f"{'' if cfg.data == 'builtin' else '; the authors evaluate_tokenizer.py used Resize + CenterCrop instead'})")
    return dataset


def reconstruction_tools(cfg, d):
    inception = load_inception_for(cfg, d) if cfg.rfid else None
    lpips_net = lpips_vgg(pretrained=True).to(d.device) if cfg.lpips else None
    return inception, lpips_net


def run_recon(cfg, d):
    """Table 1: one column per autoencoder, and the thumbnail of the first one's latent size."""
    models, size = load_autoencoders(cfg, d)
    dataset = evaluation_images(cfg, size)
    inception, lpips_net = reconstruction_tools(cfg, d)
    results = {}
    for (name, model), path in zip(models.items(), cfg.autoencoder):
        latent_numbers = model.latent_dim * model.grid ** 2
        out = evaluate_reconstruction(model, dataset, d, (0.0,), None, cfg.batch_size, cfg.num_workers, inception, lpips_net,
                                      thumbnail_side=thumbnail_side(latent_numbers))
        if d.master:
            results[name] = {**out[0.0], 'latent_numbers': latent_numbers, 'thumbnail': out['thumbnail'], 'path': path}
    if not d.master:
        return
    first = next(iter(results.values()))  # the thumbnail is of the first one's latent size
    thumbnail, side = first['thumbnail'], first['thumbnail']['side']
    print_table(['metric', *results, f'{side}x{side} thumbnail'],
                [[METRIC_LABELS[k], *[format_value(r[k]) for r in results.values()], format_value(thumbnail[k]) if k in thumbnail else '']
                 for k in ('l1', 'mse', 'psnr', 'ssim', 'lpips', 'rfid') if k in first])
    print(f"(the thumbnail, bicubic down and up, is the largest with no more numbers than the latent: {3 * side * side} vs "
          f"{first['latent_numbers']})")
    if thumbnail['exact']:
        print(f"(its PSNR is infinite: it copies {thumbnail['exact']} flat images exactly)")
    write_results(output_path(cfg, 'recon'), {'autoencoders': results, 'data': cfg.data, 'n_images': len(dataset),
                                              'image_size': size}, cfg, inception)


def recorded_autoencoder(path):
    """(path, sha256) of the autoencoder whose latents a --latent_stats file describes, as a train_dit.py
    checkpoint (its config) or latents/meta.json records them; (None, None) in the authors' latents_stats.pt."""
    if path.endswith('.json'):
        with open(path) as f:
            record = json.load(f)
    else:
        record = fileio.read_checkpoint(path).get('config')
    return (record.get('autoencoder'), record.get('autoencoder_sha256')) if isinstance(record, dict) else (None, None)


def given_latent_std(cfg):
    """--latent_stats' std, refused when the file records another autoencoder than --autoencoder: those
    statistics belong to another latent space."""
    std = read_latent_stats(cfg.latent_stats)['std']
    source, sha256 = recorded_autoencoder(cfg.latent_stats)
    path = cfg.autoencoder[0]
    if sha256 and sha256 != fileio.file_sha256(path):
        raise ValueError(f"--latent_stats {cfg.latent_stats} describes the latents of {source}, not of --autoencoder {path} "
                         f"(their sha256 differ): give the statistics made with {path}, or leave --latent_stats out to measure them")
    return std


def latent_std_for(cfg, name, model, dataset, d, given=None):
    """`given` (--latent_stats' std), else one measured on the evaluated images, of the latent a DiT learns (a
    posterior sample of a VMAE, the mean of a convolutional model). -> (std (C,), where it came from)"""
    if given is not None:
        std, source = given, f"from {cfg.latent_stats}"
    else:
        sample = dit_latent(model) == 'sample'
        std = measure_latent_std(model, dataset, d, cfg.batch_size, cfg.num_workers, cfg.seed, sample)
        source = f"measured on the posterior {'samples' if sample else 'means'} of the {len(dataset)} evaluated images"
    if len(std) != model.latent_dim:
        raise ValueError(f"the latent statistics have {len(std)} channels, the autoencoder {model.latent_dim}")
    print0(f"{name}: latent std per channel {source}: " + ' '.join(f'{s:.3g}' for s in std.tolist()))
    return std, source


def run_smoothness(cfg, d):
    """Fig. 6: reconstructions from perturbed latents, each autoencoder with its own latent std."""
    if cfg.latent_stats and len(cfg.autoencoder) > 1:
        raise ValueError("--latent_stats belongs to one autoencoder: with several, leave it out (each one's std is measured)")
    given = given_latent_std(cfg) if cfg.latent_stats else None
    models, size = load_autoencoders(cfg, d)
    dataset = evaluation_images(cfg, size)
    inception, lpips_net = reconstruction_tools(cfg, d)
    results = {}
    for name, model in models.items():
        std, source = latent_std_for(cfg, name, model, dataset, d, given)
        out = evaluate_reconstruction(model, dataset, d, cfg.eps, std, cfg.batch_size, cfg.num_workers, inception, lpips_net, cfg.seed)
        results[name] = (out, std, source)
    if not d.master:
        return
    for name, (out, _, _) in results.items():
        metrics = list(out[cfg.eps[0]])
        print(name)
        print_table(['eps', *[METRIC_LABELS[k] for k in metrics]], [[f'{e:g}', *[format_value(out[e][k]) for k in metrics]] for e in cfg.eps])
    path = output_path(cfg, 'smoothness')
    write_results(path, {'autoencoders': {name: {'eps': {f'{e:g}': out[e] for e in cfg.eps}, 'latent_std': std.tolist(),
                                                 'latent_std_source': source} for name, (out, std, source) in results.items()},
                         'data': cfg.data, 'n_images': len(dataset), 'seed': cfg.seed}, cfg, inception)
    plot_smoothness({name: out for name, (out, _, _) in results.items()}, plot_path(path))


def masked_pairs(cfg, size):
    """(image, label image) pairs: the built-in shapes with their exact masks, or a folder with a mask folder."""
    if cfg.masks == 'builtin' or cfg.data == 'builtin':
        if (cfg.masks, cfg.data) != ('builtin', 'builtin'):
            raise ValueError("the built-in shapes carry their own masks: pass --data builtin --masks builtin together")
        return builtin_masked_images(size, cfg.num_images)
    return masked_images(cfg.data, SegmentationMasks(cfg.masks), size, cfg.num_images)


def run_compression(cfg, d):
    """Fig. 7: sigma^2 and rho of each autoencoder's latent tokens and of the raw image."""
    if d.ddp:
        raise ValueError("compression runs in one process (it only encodes): start it with python, not torchrun")
    models, size = load_autoencoders(cfg, d)
    results = evaluate_compression(models, masked_pairs(cfg, size), d.device, cfg.batch_size)
    print_table(['features', 'sigma^2', 'rho', 'images with rho'],
                [[k if k != 'pixel' else 'raw image', format_value(results[k]['sigma2']), format_value(results[k]['rho']), results[k]['n_rho']]
                 for k in [*models, 'pixel']])
    path = output_path(cfg, 'compression')
    write_results(path, {'autoencoders': {k: results[k] for k in models}, 'pixel': results['pixel'], 'n_images': results['n_images'],
                         'data': cfg.data, 'masks': cfg.masks, 'image_size': size}, cfg)
    plot_compression({k: results[k] for k in [*models, 'pixel']}, plot_path(path),
                     f"{cfg.data}: {results['n_images']} images")


def run_kmeans(cfg, d):
    """Fig. 4: k-means clusters of each autoencoder's latent tokens over the images, for each k."""
    models, size = load_autoencoders(cfg, d)
    tokens = (size // shared_patch_size(models)) ** 2
    if max(cfg.ks) > tokens:
        raise ValueError(f"--ks {max(cfg.ks)}: an image has only {tokens} latent tokens at {size} px, so k can be at most {tokens}")
    dataset = build_dataset(cfg.data, size, train=False, split='val')
    if max(cfg.images) >= len(dataset):
        raise ValueError(f"--images: {cfg.data} has {len(dataset)} images, so indices go up to {len(dataset) - 1}")
    x = torch.stack([dataset[i][0] for i in cfg.images])
    images = to_uint8(x).numpy()
    maps = {}
    with torch.no_grad():
        for name, model in models.items():
            tokens = standardise_tokens(model.encode(x.to(d.device)).mean.flatten(2).transpose(1, 2).cpu())  # (h*w, C) per image
            maps[name] = [[kmeans(t, k, cfg.seed).tolist() for k in cfg.ks] for t in tokens]
    path = output_path(cfg, 'kmeans')
    write_results(path, {'autoencoders': maps, 'images': list(cfg.images), 'ks': list(cfg.ks), 'data': cfg.data}, cfg)
    plot_kmeans(images, maps, cfg.ks, next(iter(models.values())).grid, plot_path(path))


def run_projection(cfg, d):
    """Fig. 8: one image's latent tokens on their two principal axes, coloured by segment, with each
    autoencoder's sigma^2 over the evaluated set."""
    models, size = load_autoencoders(cfg, d)
    tokens = token_features(models, masked_pairs(cfg, size), d.device, cfg.batch_size, keep_images=True)
    if cfg.image >= len(tokens['labels']):
        raise ValueError(f"--image {cfg.image}: only {len(tokens['labels'])} images with masks were read (see --num_images)")
    labels = tokens['labels'][cfg.image]
    panels = {}
    for name in models:
        sigma2 = compression_statistics(tokens[name], tokens['labels'])['sigma2']
        xy = project_2d(standardise_tokens(tokens[name], tokens['labels'])[cfg.image][labels > 0])
        panels[name] = (xy.tolist(), labels[labels > 0].tolist(), sigma2)
    path = output_path(cfg, 'projection')
    write_results(path, {'autoencoders': {n: {'xy': p[0], 'labels': p[1], 'sigma2': p[2]} for n, p in panels.items()},
                         'image': cfg.image, 'n_images': len(tokens['labels']), 'data': cfg.data, 'masks': cfg.masks}, cfg)
    plot_projection(panels, tokens['images'][cfg.image], plot_path(path))


def read_results(path, key, command, row_keys=()):
    """A JSON an evaluate.py command wrote, checked for the `key` it holds and, in each autoencoder's row
    under it, the `row_keys` (another command's JSON has 'autoencoders' too); else a one-line error."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"'{path}' is not a JSON file ({type(e).__name__})") from None
    if not isinstance(results, dict) or key not in results:
        raise ValueError(f"'{path}' is not what {command} writes (no '{key}'): give the JSON of that command")
    rows = results[key] if isinstance(results[key], dict) else {key: results[key]}
    for name, row in rows.items() if row_keys else ():
        lacking = [k for k in row_keys if not isinstance(row, dict) or k not in row]
        if lacking:
            raise ValueError(f"'{path}' is not what {command} writes ('{name}' has no '{lacking[0]}'): give the JSON of that command")
    return results


def run_radar(cfg, d):
    """Fig. 2 from the JSONs of recon (required), smoothness, compression and fid (per autoencoder)."""
    generation = {}
    for item in cfg.generation:
        name, sep, path = item.partition('=')
        if not sep:
            raise ValueError(f"--generation takes name=path pairs (an evaluate.py fid JSON per autoencoder), got '{item}'")
        generation[name] = read_results(path, 'FID', 'evaluate.py fid')
    inputs = (('recon', cfg.recon, ('psnr',)), ('smoothness', cfg.smoothness, ('eps',)),
              ('compression', cfg.compression, ('sigma2', 'rho')))  # each row's keys, which another command's rows lack
    scores = radar_scores(*[read_results(path, 'autoencoders', f'evaluate.py {command}', row_keys) if path else None
                            for command, path, row_keys in inputs], generation or None)
    scaled = rescale(scores)
    print_table(['axis', *next(iter(scores.values()))], [[axis, *[f'{v:.4g}' for v in values.values()]] for axis, values in scores.items()])
    path = output_path(cfg, 'radar')
    write_results(path, {'scores': scores, 'rescaled': scaled}, cfg)
    plot_radar(scaled, plot_path(path))


def run_solvers(cfg, d):
    if d.ddp:
        raise ValueError("solvers runs in one process: start it with python, not torchrun")
    model, stats, autoencoder = load_generator(cfg.dit, cfg.autoencoder, cfg.latent_stats, 'ema', d.device)
    guidance = dict(cfg_scale=dit.guidance_scale(model, cfg.cfg_scale), cfg_interval_start=cfg.cfg_interval_start,
                    cfg_channels=cfg.cfg_channels or None, shift=cfg.shift)
    size = model.args['input_size']
    noise = seeded_noise(cfg.seed, range(cfg.num_samples), (model.in_channels, size, size)).to(d.device)
    labels = [i % model.num_classes for i in range(cfg.num_samples)]
    builtin = model.meta.get('classes') == [name for name, _, _ in BUILTIN_CLASSES]  # the shape check knows only these
    classifier = train_classifier(BuiltinShapes(autoencoder.img_size, flip=True), colour_blind=True) if builtin else None
    rows = solver_study(model, autoencoder, stats, labels, noise, reference_steps=cfg.reference_steps,
                        batch_size=cfg.batch_size, classifier=classifier, **guidance)
    print_table(['solver', 'steps', 'DiT forwards', 'latent RMSE', 'PSNR', 'recognised'],
                [[r['solver'], r['steps'], r['forwards'], f"{r['latent_rmse']:.2e}", f"{r['psnr']:.2f}",
                  format_value(r['recognised'])] for r in rows])
    euler = next(r for r in rows if (r['solver'], r['steps']) == ('euler', 250))
    match = heun_match(rows)
    print(f"Euler-250 ({euler['forwards']} forwards): " + (f"matched by Heun-{match['steps']} ({match['forwards']} forwards)"
                                                           if match else "not matched by any Heun run here"))
    out = output_path(cfg, 'solvers')
    write_results(out, {'rows': rows, 'heun_matching_euler_250': match and match['steps'], 'n_samples': cfg.num_samples,
                        'guidance': {k: v for k, v in guidance.items()}}, cfg)
    plot_solvers(rows, plot_path(out))


def run_recognition(cfg, d):
    if d.ddp:
        raise ValueError("recognition runs in one process: start it with python, not torchrun")
    if cfg.data != 'builtin' and not cfg.held_out:
        raise ValueError("evaluate.py recognition on a folder needs --held_out: real images of the same classes that --data does not hold")
    if cfg.held_out and os.path.realpath(cfg.held_out) == os.path.realpath(cfg.data):
        hint = "leave --held_out out for the built-in val split" if cfg.data == 'builtin' else "give another folder of the same classes"
        raise ValueError(f"--held_out {cfg.held_out} is the --data the judge trains on: its bar must be images it never saw ({hint})")
    model, stats, autoencoder = load_generator(cfg.dit, cfg.autoencoder, '', 'ema', d.device)
    if model.num_classes < 2:
        raise ValueError(f"{cfg.dit} is an unconditional DiT: its samples have no class to recognise")
    size = autoencoder.img_size
    train_set = build_dataset(cfg.data, size, train=True, flip=True)
    held_out = BuiltinShapes(size, split='val', per_class=200) if cfg.data == 'builtin' and not cfg.held_out else build_dataset(cfg.held_out, size)
    for name, images in (('--data', train_set), ('--held_out', held_out)):
        if images.classes != model.meta.get('classes', images.classes):
            raise ValueError(f"the classes of {name} ({', '.join(images.classes[:5])}, ...) are not those the DiT was trained on "
                             f"({', '.join(model.meta['classes'][:5])}, ...)")
    # every built-in class has its own hue: the judge must go by shape, so it is colour-blind there
    rates = recognition_study(model, autoencoder, stats, train_set, held_out, colour_blind=cfg.data == 'builtin',
                              num_samples=cfg.num_samples, seed=cfg.seed, batch_size=cfg.batch_size, steps=cfg.steps,
                              solver=cfg.solver, shift=cfg.shift, cfg_scale=dit.guidance_scale(model, cfg.cfg_scale),
                              cfg_interval_start=cfg.cfg_interval_start)
    kinds = ('real', 'reconstructions', 'samples')
    real, recon, samples = (sum(rates[k]) / len(rates[k]) for k in kinds)
    print_table(['class', 'real held-out', 'their reconstructions', 'samples'],
                [[name, *(f'{rates[k][c]:.2f}' for k in kinds)] for c, name in enumerate(train_set.classes)])
    print(f"recognised as their class: samples {100 * samples:.1f}% of {cfg.num_samples}, real held-out images "
          f"{100 * real:.1f}% of {len(held_out)} ({100 * samples / real:.0f}% of the real rate), the autoencoder's "
          f"reconstructions of them {100 * recon:.1f}% ({'colour-blind' if cfg.data == 'builtin' else 'colour'} judge "
          f"trained on {len(train_set)} images of {cfg.data})")
    write_results(output_path(cfg, 'recognition'), {**rates, 'real_mean': real, 'reconstructions_mean': recon,
                                                    'samples_mean': samples, 'classes': train_set.classes}, cfg)


@dataclasses.dataclass
class Command:
    config: type
    run: Callable
    required: tuple  # flags without a sensible default, checked before any work
    help: str
    plots: bool = False  # writes a PNG beside its JSON


COMMANDS = {
    'fid': Command(FidConfig, run_fid, (), 'ADM-compatible FID, sFID, IS, precision and recall of SAMPLES against REF.'),
    'recon': Command(ReconConfig, run_recon, ('autoencoder', 'data'),
                     'Reconstruction metrics of an autoencoder from the posterior mean: L1, MSE, PSNR, SSIM, LPIPS, rFID.'),
    'smoothness': Command(SmoothnessConfig, run_smoothness, ('autoencoder', 'data'),
                          'Latent smoothness (Fig. 6): reconstruction metrics from latents perturbed by eps x channel std x N(0, I).', plots=True),
    'compression': Command(CompressionConfig, run_compression, ('autoencoder', 'data', 'masks'),
                           'Perceptual compression (Fig. 7): within-segment variance and disentanglement of latents vs pixels.', plots=True),
    'kmeans': Command(KmeansConfig, run_kmeans, ('autoencoder', 'data'),
                      'Hierarchical compression (Fig. 4): k-means clusters of the latent tokens over images, for several k.', plots=True),
    'projection': Command(ProjectionConfig, run_projection, ('autoencoder', 'data', 'masks'),
                          "Compressed latents (Fig. 8): one image's tokens on two principal axes, coloured by segment.", plots=True),
    'radar': Command(RadarConfig, run_radar, ('recon',),
                     'The summary (Fig. 2): each property rescaled over the autoencoders, from the JSONs of the commands above.', plots=True),
    'solvers': Command(SolversConfig, run_solvers, ('dit',),
                       'Sampler accuracy: Euler and Heun at several step counts against a fine reference, same noise.', plots=True),
    'recognition': Command(RecognitionConfig, run_recognition, ('dit', 'data'),
                           'Do samples show their class? A small classifier trained on real images judges samples and held-out real images.'),
}


def check_config(cfg):
    """Settings that would run but make no sense, refused before any work; 0 keeps its meaning (the
    autoencoder's size, all images). An autoencoder command's image size must give whole latents (f8)."""
    if isinstance(cfg, FidConfig):
        return common.check_settings(cfg, at_least={'batch_size': 1, 'image_size': 1}, zero_ok=('image_size',))
    if isinstance(cfg, RadarConfig):
        return
    if isinstance(cfg, SamplingConfig):
        common.check_settings(cfg, at_least={'num_samples': 1, 'batch_size': 1, 'seed': 0, 'cfg_interval_start': 0, 'shift': 0})
        if isinstance(cfg, SolversConfig):
            return common.check_settings(cfg, at_least={'reference_steps': 2, 'cfg_channels': 0})
        return common.check_settings(cfg, at_least={'steps': 2}, choices={'solver': dit.SOLVERS})
    common.check_settings(cfg, at_least={'batch_size': 1, 'num_images': 0, 'image_size': 8}, multiple_of={'image_size': 8},
                          zero_ok=('image_size',))
    if isinstance(cfg, ReconConfig):  # recon, smoothness
        common.check_settings(cfg, at_least={'num_workers': 0})
    if isinstance(cfg, SmoothnessConfig):
        common.check_settings(cfg, at_least={'eps': 0, 'seed': 0})
    if isinstance(cfg, KmeansConfig):
        common.check_settings(cfg, at_least={'images': 0, 'ks': 1, 'seed': 0})
    if isinstance(cfg, ProjectionConfig):
        common.check_settings(cfg, at_least={'image': 0})


def parse_command(argv):
    """-> (command name, its config). Each command's flags come from its config dataclass."""
    parser = argparse.ArgumentParser(prog='evaluate.py', description=__doc__.split('\n\n')[0],
                                     epilog='`evaluate.py REF SAMPLES` (no command) is `evaluate.py fid REF SAMPLES`.')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='{' + ','.join(COMMANDS) + '}')
    parsers = {}
    for name, command in COMMANDS.items():
        parsers[name] = subparsers.add_parser(name, help=command.help, description=command.help)
        common.add_config_arguments(parsers[name], command.config)
    first = argv[0] if argv else ''
    if first not in COMMANDS and first.isidentifier() and not os.path.exists(first):  # a word, not REF: a mistyped command
        raise ValueError(f"unknown command '{first}': choose one of {', '.join(COMMANDS)} (or give fid's REF and SAMPLES)")
    if argv and argv[0] not in COMMANDS and argv[0] not in ('-h', '--help'):
        argv = ['fid', *argv]  # backward compatibility: generation metrics were the command-less default before sub-commands
    args = parser.parse_args(argv)
    return args.command, common.config_from_args(COMMANDS[args.command].config, args, parsers[args.command])


def main(argv=None):
    with common.clear_errors():
        name, cfg = parse_command(sys.argv[1:] if argv is None else list(argv))
        command = COMMANDS[name]
        missing = [f'--{flag}' for flag in command.required if not getattr(cfg, flag)]
        if missing:
            raise ValueError(f"evaluate.py {name} needs {' and '.join(missing)} (see evaluate.py {name} -h)")
        check_config(cfg)
        check_output_paths(name, cfg)
        d = common.setup_distributed(getattr(cfg, 'device', 'cpu'))  # radar only reads JSON files
        command.run(cfg, d)
        common.cleanup_distributed()  # not on an error: a rank that fails leaves, and torchrun stops the others


if __name__ == '__main__':
    main()
