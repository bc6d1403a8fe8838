"""
The paper's comparisons of autoencoders (section 5) and the small recipe's judges, each a JSON with its
figure beside it. Run from the repository root:

    python -m paper smoothness --autoencoder vmae.pt sdvae.pt --data imagenet/val   # Fig. 6
    python -m paper compression --autoencoder vmae.pt sdvae.pt --data ADE/images --masks ADE/annotations  # Fig. 7
    python -m paper projection --autoencoder vmae.pt sdvae.pt --data ADE/images --masks ADE/annotations   # Fig. 8
    python -m paper kmeans --autoencoder vmae.pt sdvae.pt --data imagenet/val --images 0 7    # Fig. 4
    python -m paper radar --recon analysis/recon.json --smoothness analysis/smoothness.json \
        --compression analysis/compression.json                       # Fig. 2 (recon: evaluate.py recon)
    python -m paper solvers --dit dit.pt                              # Euler vs Heun against a fine reference
    python -m paper recognition --dit dit.pt --data builtin           # do samples show their class?
The convolutional baselines train with `python -m paper.train_convae`, and `python -m paper.study` runs
the whole comparison at small scale.
"""

import dataclasses
import json
import os
import sys

import torch

import common
import dit
import fileio
from autoencoders import dit_latent, load_autoencoders, load_generator
from common import format_value, print0, print_table, seeded_noise
from data import BUILTIN_CLASSES, BuiltinShapes, build_dataset, to_uint8
from dit import read_latent_stats
from evaluate import AutoencoderConfig, ReconConfig, evaluate_reconstruction, reconstruction_tools, evaluation_images, inception_info
from metrics import METRIC_LABELS
from paper.analyses import (SMOOTHNESS_EPS, SegmentationMasks, builtin_masked_images, compression_statistics, evaluate_compression,
                            kmeans, masked_images, measure_latent_std, project_2d, radar_scores, rescale, shared_patch_size,
                            standardise_tokens, token_features)
from paper.figures import plot_compression, plot_kmeans, plot_projection, plot_radar, plot_smoothness, plot_solvers
from paper.judges import heun_match, recognition_study, solver_study, train_classifier

#################################################################################
#                                   Commands                                    #
#################################################################################

@dataclasses.dataclass
class SmoothnessConfig(ReconConfig):
    eps: tuple[float, ...] = SMOOTHNESS_EPS  # noise levels, in latent stds
    noise: str = 'channel'              # 'channel': eps x each channel's std (the paper); 'isotropic': eps x one std, the channels' RMS
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
    smoothness: str = ''                # python -m paper smoothness JSON of the same autoencoders
    compression: str = ''               # python -m paper compression JSON of the same autoencoders
    generation: tuple[str, ...] = ()    # name=path: evaluate.py fid JSON of a DiT on each autoencoder's latents
    out: str = ''                       # JSON path, the PNG beside it; '': radar.json beside the recon JSON


@dataclasses.dataclass
class SamplingConfig:
    dit: str = ''                       # train_dit.py checkpoint; required
    autoencoder: str = ''               # the autoencoder that decodes its latents; '': the one the DiT was trained on
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
    models, size = load_autoencoders(cfg.autoencoder, cfg.names, d.device, cfg.image_size)
    dataset = evaluation_images(cfg, size)
    inception, lpips_net = reconstruction_tools(cfg, d)
    results = {}
    for name, model in models.items():
        std, source = latent_std_for(cfg, name, model, dataset, d, given)
        if cfg.noise == 'isotropic':  # the same noise energy, spread evenly: do a few large channels carry the loss?
            std, source = std.pow(2).mean().sqrt().expand_as(std).clone(), f"the RMS of the channels' std {source}"
        out = evaluate_reconstruction(model, dataset, d, cfg.eps, std, cfg.batch_size, cfg.num_workers, inception, lpips_net, cfg.seed)
        results[name] = (out, std, source)
    if not d.master:
        return
    for name, (out, _, _) in results.items():
        metrics = list(out[cfg.eps[0]])
        print(name)
        print_table(['eps', *[METRIC_LABELS[k] for k in metrics]], [[f'{e:g}', *[format_value(out[e][k]) for k in metrics]] for e in cfg.eps])
    path = output_path(cfg, 'smoothness')
    common.write_results(path, {'autoencoders': {name: {'eps': {f'{e:g}': out[e] for e in cfg.eps}, 'latent_std': std.tolist(),
                                                 'latent_std_source': source} for name, (out, std, source) in results.items()},
                         'data': cfg.data, 'n_images': len(dataset), 'seed': cfg.seed, 'noise': cfg.noise,
                         **(inception_info(inception) if inception else {})}, cfg)
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
    models, size = load_autoencoders(cfg.autoencoder, cfg.names, d.device, cfg.image_size)
    results = evaluate_compression(models, masked_pairs(cfg, size), d.device, cfg.batch_size)
    print_table(['features', 'sigma^2', 'rho', 'images with rho'],
                [[k if k != 'pixel' else 'raw image', format_value(results[k]['sigma2']), format_value(results[k]['rho']), results[k]['n_rho']]
                 for k in [*models, 'pixel']])
    path = output_path(cfg, 'compression')
    common.write_results(path, {'autoencoders': {k: results[k] for k in models}, 'pixel': results['pixel'], 'n_images': results['n_images'],
                         'data': cfg.data, 'masks': cfg.masks, 'image_size': size}, cfg)
    plot_compression({k: results[k] for k in [*models, 'pixel']}, plot_path(path),
                     f"{cfg.data}: {results['n_images']} images")


def run_kmeans(cfg, d):
    """Fig. 4: k-means clusters of each autoencoder's latent tokens over the images, for each k."""
    models, size = load_autoencoders(cfg.autoencoder, cfg.names, d.device, cfg.image_size)
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
    common.write_results(path, {'autoencoders': maps, 'images': list(cfg.images), 'ks': list(cfg.ks), 'data': cfg.data}, cfg)
    plot_kmeans(images, maps, cfg.ks, next(iter(models.values())).grid, plot_path(path))


def run_projection(cfg, d):
    """Fig. 8: one image's latent tokens on their two principal axes, coloured by segment, with each
    autoencoder's sigma^2 over the evaluated set."""
    models, size = load_autoencoders(cfg.autoencoder, cfg.names, d.device, cfg.image_size)
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
    common.write_results(path, {'autoencoders': {n: {'xy': p[0], 'labels': p[1], 'sigma2': p[2]} for n, p in panels.items()},
                         'image': cfg.image, 'n_images': len(tokens['labels']), 'data': cfg.data, 'masks': cfg.masks}, cfg)
    plot_projection(panels, tokens['images'][cfg.image], plot_path(path))


def read_results(path, key, command, row_keys=()):
    """A JSON that evaluate.py or this wing wrote, checked for the `key` it holds and, in each autoencoder's row
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
    scores = radar_scores(*[read_results(path, 'autoencoders', f"{'evaluate.py' if command == 'recon' else 'python -m paper'} {command}", row_keys) if path else None
                            for command, path, row_keys in inputs], generation or None)
    scaled = rescale(scores)
    print_table(['axis', *next(iter(scores.values()))], [[axis, *[f'{v:.4g}' for v in values.values()]] for axis, values in scores.items()])
    path = output_path(cfg, 'radar')
    common.write_results(path, {'scores': scores, 'rescaled': scaled}, cfg)
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
    common.write_results(out, {'rows': rows, 'heun_matching_euler_250': match and match['steps'], 'n_samples': cfg.num_samples,
                        'guidance': {k: v for k, v in guidance.items()}}, cfg)
    plot_solvers(rows, plot_path(out))


def run_recognition(cfg, d):
    if d.ddp:
        raise ValueError("recognition runs in one process: start it with python, not torchrun")
    if cfg.data != 'builtin' and not cfg.held_out:
        raise ValueError("recognition on a folder needs --held_out: real images of the same classes that --data does not hold")
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
    size = model.args['input_size']
    noise = seeded_noise(cfg.seed, range(cfg.num_samples), (model.in_channels, size, size)).to(d.device)
    rates = recognition_study(model, autoencoder, stats, train_set, held_out, colour_blind=cfg.data == 'builtin', noise=noise,
                              batch_size=cfg.batch_size, steps=cfg.steps, solver=cfg.solver, shift=cfg.shift,
                              cfg_scale=dit.guidance_scale(model, cfg.cfg_scale), cfg_interval_start=cfg.cfg_interval_start)
    kinds = ('real', 'reconstructions', 'samples')
    real, recon, samples = (sum(rates[k]) / len(rates[k]) for k in kinds)
    print_table(['class', 'real held-out', 'their reconstructions', 'samples'],
                [[name, *(f'{rates[k][c]:.2f}' for k in kinds)] for c, name in enumerate(train_set.classes)])
    print(f"recognised as their class: samples {100 * samples:.1f}% of {cfg.num_samples}, real held-out images "
          f"{100 * real:.1f}% of {len(held_out)} ({100 * samples / real:.0f}% of the real rate), the autoencoder's "
          f"reconstructions of them {100 * recon:.1f}% ({'colour-blind' if cfg.data == 'builtin' else 'colour'} judge "
          f"trained on {len(train_set)} images of {cfg.data})")
    common.write_results(output_path(cfg, 'recognition'), {**rates, 'real_mean': real, 'reconstructions_mean': recon,
                                                    'samples_mean': samples, 'classes': train_set.classes}, cfg)


def output_path(cfg, command):
    """--out, else beside the input: the recon JSON (radar), the DiT (solvers, recognition), the checkpoint
    of a single autoencoder; with several, analysis/<command>.json."""
    if cfg.out:
        return cfg.out
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


#################################################################################
#                                      CLI                                      #
#################################################################################

COMMANDS = {  # name: (config, run, flags without a sensible default, help)
    'smoothness': (SmoothnessConfig, run_smoothness, ('autoencoder', 'data'),
                   'Latent smoothness (Fig. 6): reconstruction metrics from latents perturbed by eps x channel std x N(0, I).'),
    'compression': (CompressionConfig, run_compression, ('autoencoder', 'data', 'masks'),
                    'Perceptual compression (Fig. 7): within-segment variance and disentanglement of latents vs pixels.'),
    'kmeans': (KmeansConfig, run_kmeans, ('autoencoder', 'data'),
               'Hierarchical compression (Fig. 4): k-means clusters of the latent tokens over images, for several k.'),
    'projection': (ProjectionConfig, run_projection, ('autoencoder', 'data', 'masks'),
                   "Compressed latents (Fig. 8): one image's tokens on two principal axes, coloured by segment."),
    'radar': (RadarConfig, run_radar, ('recon',),
              'The summary (Fig. 2): each property rescaled over the autoencoders, from the JSONs of the commands above.'),
    'solvers': (SolversConfig, run_solvers, ('dit',),
                'Sampler accuracy: Euler and Heun at several step counts against a fine reference, same noise.'),
    'recognition': (RecognitionConfig, run_recognition, ('dit', 'data'),
                    'Do samples show their class? A small classifier trained on real images judges samples and held-out real images.'),
}


def check_config(name, cfg):
    """Missing inputs, values that would run but mislead, and output paths that could not be written, refused
    before any work; 0 keeps its meaning (the autoencoder's size, all images)."""
    missing = [f'--{flag}' for flag in COMMANDS[name][2] if not getattr(cfg, flag)]
    if missing:
        raise ValueError(f"python -m paper {name} needs {' and '.join(missing)} (see python -m paper {name} -h)")
    for field, least in (('batch_size', 1), ('num_images', 0), ('num_workers', 0), ('seed', 0), ('num_samples', 1), ('image', 0),
                         ('reference_steps', 2), ('steps', 2), ('cfg_channels', 0), ('shift', 0), ('cfg_interval_start', 0)):
        values = getattr(cfg, field, least)
        if isinstance(values, (int, float)) and values < least:
            raise ValueError(f"--{field} must be at least {least}, got {values}")
    for field, least in (('eps', 0), ('images', 0), ('ks', 1)):
        if hasattr(cfg, field) and (not getattr(cfg, field) or min(getattr(cfg, field)) < least):
            raise ValueError(f"--{field} needs one or more values, each at least {least}")
    if getattr(cfg, 'image_size', 0) % 8 or getattr(cfg, 'image_size', 0) < 0:
        raise ValueError(f"--image_size must be 0 (the autoencoder's) or a positive multiple of 8, got {cfg.image_size}")
    if getattr(cfg, 'noise', 'channel') not in ('channel', 'isotropic'):
        raise ValueError(f"--noise must be channel or isotropic, got '{cfg.noise}'")
    if getattr(cfg, 'solver', 'euler') not in dit.SOLVERS:
        raise ValueError(f"--solver must be one of {', '.join(dit.SOLVERS)}, got '{cfg.solver}'")
    common.check_device(getattr(cfg, 'device', 'cpu'))
    path = output_path(cfg, name)
    fileio.check_output_file(path, '--out' if cfg.out else 'the default output')
    if name != 'recognition' and os.path.isdir(plot_path(path)):
        raise ValueError(f"the plot {plot_path(path)} (beside {path}) is a folder: choose another --out")


def main(argv=None):
    with common.clear_errors():
        commands = {name: (config, help_text) for name, (config, _, _, help_text) in COMMANDS.items()}
        name, cfg = common.parse_command(commands, sys.argv[1:] if argv is None else list(argv), 'python -m paper',
                                         __doc__.split('\n\n')[0])
        check_config(name, cfg)
        d = common.setup_distributed(getattr(cfg, 'device', 'cpu'))  # radar only reads JSON files
        COMMANDS[name][1](cfg, d)
        common.cleanup_distributed()


if __name__ == '__main__':
    main()
