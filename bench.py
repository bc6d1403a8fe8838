"""
Speed of nano-LDMAE's hot loops in one run: training steps of the VMAE (stage 1) and the DiT, eager
and compiled, latent extraction, CFG sampling and Inception features. Each row gives images/s and the
achieved FLOP/s as a fraction of this machine's dense matmul throughput, measured in the same run in
the row's precision, so that numbers from noisy or different machines compare.

The `autoencoders` rows put the VMAE beside SD-VAE (SD3's convolutional autoencoder) at 256 px, each
training with its own objective (the VMAE's stage 1; SD-VAE's L1 + LPIPS + KL + PatchGAN with the
discriminator on), encoding and decoding; a table of their ratios follows, beside the paper's Table 2
(VMAE: 13.4% of the parameters, 4.1% of the GFLOPs, 37.5% of the training time).

FLOPs are counted by PyTorch's FlopCounterMode on one call of each row's step built for one image
(FLOPs are linear in the batch), attention on the math backend so that the counter sees it on every
device: 2 per multiply-add of every Linear, conv and attention matmul. A training step counts its
forward and backward as they run, a hair under the usual "3 x the forward" (that convention also
counts a gradient of the input images, which nothing computes: 0.004-0.1% more on these models).
Norms, activations, the resize and the optimizer step are timed but not counted; data loading is
neither (batches are synthetic and already on the device).

On a GPU: the paper's sizes in bf16 autocast; Inception in fp32 with TF32 off, as evaluate.py runs it.
Extraction and sampling rows call train_dit.py's and sample.py's own functions, in bf16 autocast and in fp32
(on a GPU with TF32 matmuls, as the scripts set them), sampling eager and compiled.
On a CPU, fp32, and the batches, sampling steps and DiT latents shrink to finish in a few minutes.

$ python bench.py                              # everything: a few minutes, most of it compiling
$ python bench.py --quick                      # seconds: tiny models, no compile (a smoke test)
$ python bench.py --only dit_train --batch_size_dit_train 128 --json bench.json
"""

import contextlib
import copy
import dataclasses
import gc
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import common
import dit
import fileio
import inception
import sample
import train_dit
import vmae
from paper import convae

# -----------------------------------------------------------------------------
# sizes: per device kind; flags override

SIZES = {
    # VMAE stage 1 at 128 px; DiT-B/1 on 16x32x32 latents (64 per GPU: about 40 GB eager, where 128 would not fit
    # in 80 GB); extraction batch = train_dit's 64 images x (image + mirror); sampling as sample.py --batch_size 64
    'gpu': dict(vmae='VMAE-f8d16', dit='DiT-B/1', train_px=128, encode_px=256, latent=32, vmae_train=128, dit_train=64,
                encode=128, sample=64, inception=200, steps=250, warmup=3, iters=20,
                sdvae='SD3-VAE', ae_train=16, ae_infer=32),
    # the same models, small batches; DiT latents 16x16 (a quarter of the tokens: one DiT-B/1 step at 32x32 is ~30 s here)
    'cpu': dict(vmae='VMAE-f8d16', dit='DiT-B/1', train_px=128, encode_px=256, latent=16, vmae_train=2, dit_train=1,
                encode=2, sample=1, inception=2, steps=4, warmup=1, iters=2, sdvae='SD3-VAE', ae_train=1, ae_infer=1),
    'quick': dict(vmae='VMAE-tiny', dit='DiT-T/1', train_px=32, encode_px=64, latent=8, vmae_train=2, dit_train=2,
                  encode=2, sample=2, inception=1, steps=6, warmup=1, iters=1, sdvae='ConvAE-tiny', ae_train=1, ae_infer=2),
}
MASK_RATIO = 0.25                      # stage 1
CFG = dict(cfg_scale=10.0, cfg_interval_start=0.1, cfg_channels=3, shift=0.3)  # the paper's ImageNet sampler
MATMUL_N = {'cuda': 8192, 'cpu': 2048}  # big enough to reach the BLAS's best
FULL_STEPS = 250                       # seconds per image are also given for this many steps

# -----------------------------------------------------------------------------
# FLOPs

def sampler_forwards(steps):
    """DiT forwards per image in euler_sample: steps - 1 evaluations; those with t >= the interval start run
    the conditional and unconditional velocity in one batch of 2N."""
    t = dit.timestep_grid(steps, CFG['shift'])[:-1]
    return len(t) + int((t >= CFG['cfg_interval_start']).sum())


def count_flops(step):
    """FLOPs of one call of `step`, counted by PyTorch as it runs: 2 per multiply-add of every matmul,
    convolution and attention, forward and (in training steps) backward. Attention runs on the math
    backend (bmm's) on every device: the counter does not see the fused CPU kernel, and counts CUDA's
    flash backward with its recomputed scores (hardware, not model, FLOPs). Compiled code is invisible
    to the counter, so compiled steps are counted eagerly."""
    with sdpa_kernel(SDPBackend.MATH), torch.compiler.set_stance('force_eager'), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()

# -----------------------------------------------------------------------------
# timing

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def seconds_per_call(fn, warmup, iters, device):
    for _ in range(warmup):
        fn()
    sync(device)  # queued warm-up work must not leak into the timed window
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def matmul_flops_per_s(n, dtype, device):
    """Dense square matmuls: the most this machine's BLAS reaches, the yardstick of every row."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    once = seconds_per_call(lambda: a @ b, 1, 1, device)  # the warm-up call pays the library's set-up
    iters = max(3, int(0.5 / once))  # ~0.5 s timed, after ~0.1 s more warm-up (GPU clocks ramp up)
    return 2 * n ** 3 / seconds_per_call(lambda: a @ b, iters // 4, iters, device)


def precision(kind):
    """The context a row runs under: bf16 autocast, fp32 with TF32 matmuls (on since the start), or exact fp32."""
    if kind == 'fp32':
        return common.exact_fp32()
    if kind == 'bf16':
        return torch.autocast('cuda' if torch.cuda.is_available() else 'cpu', dtype=torch.bfloat16)
    return contextlib.nullcontext()

# -----------------------------------------------------------------------------
# the benchmarks: each returns (function for one batch, images per batch, size text)

def randomise_zero_init(model):
    """adaLN-Zero and the zeroed output layer would make the DiT's backward multiply zeros, which GPUs do
    faster than real data (less power, higher clocks): small random values instead."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(std=0.02)
    return model


def vmae_train(s, device, dtype, compiled, px=None, batch=None):
    px, batch = px or s['train_px'], batch or s['vmae_train']
    model = vmae.VMAE_models[s['vmae']](img_size=px).to(device)
    perceptual = vmae.lpips_vgg(pretrained=False).to(device)  # random VGG: the same FLOPs, no download
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    train_model = torch.compile(model) if compiled else model  # as train_vmae.py: the model, not LPIPS
    x = torch.rand(batch, 3, px, px, device=device) * 2 - 1
    weights = vmae.LossWeights()

    def step():
        with precision(dtype):
            recon, mask, posterior = train_model(x, mask_ratio=MASK_RATIO, sample_posterior=True)
            loss, _ = vmae.vmae_loss(x, recon, mask, posterior, model.patch_size, weights, perceptual)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    size = f"{s['vmae']} {px}px mask {MASK_RATIO} +LPIPS"
    return step, len(x), size


def sdvae_train(s, device, dtype):
    """train_vmae.py's SD-VAE step past disc_start: L1 + LPIPS + KL, the adversarial term with its adaptive
    weight (two extra gradients at the last layer), then the discriminator's hinge step."""
    model = convae.ConvAE_models[s['sdvae']](img_size=s['encode_px']).to(device)
    disc = convae.NLayerDiscriminator().to(device)
    perceptual = vmae.lpips_vgg(pretrained=False).to(device)
    optimizer, disc_optimizer = (torch.optim.Adam(m.parameters(), lr=1e-5, betas=(0.5, 0.9), fused=True) for m in (model, disc))
    x = torch.rand(s['ae_train'], 3, s['encode_px'], s['encode_px'], device=device) * 2 - 1

    def step():
        with precision(dtype):
            recon, posterior = model(x)
            loss, nll, _ = convae.convae_loss(x, recon, posterior, 'l1', 1.0, 1.0, 1e-6, perceptual=perceptual)
            disc.requires_grad_(False)
            g_loss = convae.generator_loss(disc(recon))
            loss = loss + 0.5 * convae.adaptive_weight(nll, g_loss, model.decoder.conv_out.weight) * g_loss
        loss.backward()
        disc.requires_grad_(True)
        with precision(dtype):
            d_loss = convae.hinge_d_loss(disc(x), disc(recon.detach()))
        d_loss.backward()
        for opt in (optimizer, disc_optimizer):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step, len(x), f"{s['sdvae']} {s['encode_px']}px L1+LPIPS+KL+GAN"


def autoencoder(name, px, device):
    family = vmae.VMAE_models if name in vmae.VMAE_models else convae.ConvAE_models
    return family[name](img_size=px).to(device).eval()


def ae_inference(s, device, dtype, name, part):
    """An autoencoder's encoder (images -> posterior) or decoder (latents -> images) at encode_px."""
    model = autoencoder(name, s['encode_px'], device)
    if part == 'encode':
        x, run, size = torch.rand(s['ae_infer'], 3, s['encode_px'], s['encode_px'], device=device) * 2 - 1, model.encode, f"{s['encode_px']}px"
    else:
        x, run, size = torch.randn(s['ae_infer'], model.latent_dim, model.grid, model.grid, device=device), model.decode, \
            f"{model.latent_dim}x{model.grid}x{model.grid}"

    @torch.no_grad()
    def step():
        with precision(dtype):
            run(x)
    return step, len(x), f"{name} {size}"


def dit_train(s, device, dtype, compiled):
    model = randomise_zero_init(dit.DiT_models[s['dit']](input_size=s['latent'])).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    train_model = torch.compile(model) if compiled else model
    moments = torch.randn(s['dit_train'], 2 * model.in_channels, s['latent'], s['latent'], device=device)
    y = torch.randint(0, model.num_classes, (len(moments),), device=device)
    mean_c, std_c = torch.zeros(1, model.in_channels, 1, 1, device=device), torch.ones(1, model.in_channels, 1, 1, device=device)

    def step():  # train_dit.py's step: a standardised posterior sample, the flow loss, AdamW, the EMA
        mean, logvar = moments.chunk(2, dim=1)
        x1 = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) - mean_c) / std_c
        with precision(dtype):
            loss = dit.flow_loss(train_model, x1, y).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dit.update_ema(ema, model, 0.9999)
    size = f"{s['dit']} {model.in_channels}x{s['latent']}x{s['latent']}"
    return step, len(y), size


def script_dtype(kind):
    """A row's precision as the scripts' --dtype: tf32 is their fp32 (TF32 matmuls on, as they set it)."""
    return 'fp32' if kind == 'tf32' else kind


def extraction(s, device, dtype):
    """train_dit.py's own encode_moments: each image and its mirror through the VMAE encoder."""
    model = vmae.VMAE_models[s['vmae']](img_size=s['encode_px']).to(device).eval()
    x = torch.rand(s['encode'], 3, s['encode_px'], s['encode_px'], device=device) * 2 - 1

    def step():
        train_dit.encode_moments(model, x, script_dtype(dtype))
    return step, len(x), f"{s['vmae']} {s['encode_px']}px, image + mirror"


def sampling(s, device, dtype, compiled):
    """sample.py's own generate: noise, the Euler/CFG flow, de-standardise, the VMAE decode (~0.02% of the FLOPs)."""
    model = randomise_zero_init(dit.DiT_models[s['dit']](input_size=s['latent'])).to(device).eval()
    vae = vmae.VMAE_models[s['vmae']](img_size=8 * s['latent']).to(device).eval()
    stats = {'mean': torch.zeros(model.in_channels, device=device), 'std': torch.ones(model.in_channels, device=device)}
    runner = torch.compile(model) if compiled else model
    labels = [i % model.num_classes for i in range(s['sample'])]

    def step(steps=s['steps']):
        sample.generate(runner, vae, stats, labels, range(len(labels)), 0, dict(CFG, steps=steps), script_dtype(dtype))
    step(3)  # the warm-up (and compile), short: 3 grid points = an unguided evaluation (batch N) and a guided one (2N)
    size = f"{s['dit']} {model.in_channels}x{s['latent']}x{s['latent']} {s['steps']} steps cfg {CFG['cfg_scale']:g} ch{CFG['cfg_channels']}"
    return step, len(labels), size


def inception_forward(s, device, dtype):
    model = inception.FIDInceptionV3().to(device).eval().requires_grad_(False)
    images = torch.randint(0, 256, (s['inception'], 3, 256, 256), dtype=torch.uint8, device=device)  # ADM npz samples

    @torch.no_grad()
    def step():
        with precision(dtype):
            model(images)  # resized to 299 inside: timed, but a gather and a lerp count no FLOPs
    return step, len(images), 'FID Inception-v3 256->299px'

# -----------------------------------------------------------------------------

BENCHES = ('vmae_train', 'dit_train', 'encode', 'sample', 'inception', 'autoencoders')
BATCHES = ('vmae_train', 'dit_train', 'encode', 'sample', 'inception', 'ae_train', 'ae_infer')  # the keys of SIZES that are batches


@dataclasses.dataclass
class Config:
    quick: bool = False            # tiny models and batches, no compile: a smoke test in seconds
    skip_compile: bool = False     # only eager training steps
    only: tuple[str, ...] = ()     # run only these of: vmae_train, dit_train, encode, sample, inception, autoencoders
    device: str = 'auto'           # 'auto', 'cuda' or 'cpu'
    batch_size_vmae_train: int = 0  # 0: the device's default
    batch_size_dit_train: int = 0  # 0: the device's default
    batch_size_encode: int = 0     # 0: the device's default
    batch_size_sample: int = 0     # 0: the device's default
    batch_size_inception: int = 0  # 0: the device's default
    batch_size_autoencoders: int = 0  # training batch of the autoencoder comparison (inference: twice it); 0: the default
    sample_steps: int = 0          # Euler grid points; 0: 250 on a GPU, 4 on a CPU
    json: str = ''                 # also write the results here


def check(cfg):
    """Settings that would run but mislead, refused before any work; 0 keeps the device's default."""
    if set(cfg.only) - set(BENCHES):
        raise ValueError(f"--only takes {', '.join(BENCHES)}")
    for name in [f'batch_size_{b}' for b in BENCHES] + ['sample_steps']:
        if getattr(cfg, name) < 0 or (name == 'sample_steps' and getattr(cfg, name) == 1):
            raise ValueError(f"--{name} must be 0 (the default) or at least {2 if name == 'sample_steps' else 1}, got {getattr(cfg, name)}")


def sizes(cfg, cuda):
    """The device kind's SIZES, with the flags' batch sizes and sampling steps where given."""
    s = dict(SIZES['quick' if cfg.quick else 'gpu' if cuda else 'cpu'])
    given = {name: getattr(cfg, f'batch_size_{name}') for name in BENCHES if name != 'autoencoders'} | {'steps': cfg.sample_steps}
    if cfg.batch_size_autoencoders:
        given.update(ae_train=cfg.batch_size_autoencoders, ae_infer=2 * cfg.batch_size_autoencoders)
    s.update({k: v for k, v in given.items() if v})
    return s


def yardstick(device):
    """Dense matmul FLOP/s in each precision a row can use."""
    ref = {}
    for kind in (['bf16', 'tf32', 'fp32'] if device.type == 'cuda' else ['bf16', 'fp32']):
        with precision(kind):
            ref[kind] = matmul_flops_per_s(MATMUL_N[device.type], torch.bfloat16 if kind == 'bf16' else torch.float32, device)
    return ref


def plan(device, train_dtype, compile_too):
    """(bench, mode, dtype, build) of each row to run, in order; build(sizes) -> the row's benchmark. Extraction
    and sampling run in both of the scripts' precisions: bf16 autocast and fp32 (with TF32 matmuls on a GPU)."""
    infer = ['bf16', 'tf32' if device.type == 'cuda' else 'fp32']
    rows = [('vmae_train', 'eager', train_dtype, lambda s: vmae_train(s, device, train_dtype, compiled=False)),
            ('vmae_train', 'compiled', train_dtype, lambda s: vmae_train(s, device, train_dtype, compiled=True)),
            ('dit_train', 'eager', train_dtype, lambda s: dit_train(s, device, train_dtype, compiled=False)),
            ('dit_train', 'compiled', train_dtype, lambda s: dit_train(s, device, train_dtype, compiled=True))]
    rows += [('encode', 'eager', kind, lambda s, kind=kind: extraction(s, device, kind)) for kind in infer]
    rows += [('sample', mode, kind, lambda s, kind=kind, mode=mode: sampling(s, device, kind, compiled=mode == 'compiled'))
             for mode in ('eager', 'compiled') for kind in infer]
    rows += [('inception', 'eager', 'fp32', lambda s: inception_forward(s, device, 'fp32')),
             ('autoencoders', 'vmae train', train_dtype,
              lambda s: vmae_train(s, device, train_dtype, compiled=False, px=s['encode_px'], batch=s['ae_train'])),
             ('autoencoders', 'sdvae train', train_dtype, lambda s: sdvae_train(s, device, train_dtype))]
    rows += [('autoencoders', f'{who} {part}', train_dtype, lambda s, who=who, part=part: ae_inference(s, device, train_dtype, s[who], part))
             for part in ('encode', 'decode') for who in ('vmae', 'sdvae')]
    return [row for row in rows if compile_too or row[1] != 'compiled']


def main(argv=None):
    cfg = common.parse_config(Config, argv, description=__doc__.split('\n\n')[0])
    check(cfg)
    device = torch.device(cfg.device if cfg.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu')
    cuda = device.type == 'cuda'
    common.speed_settings()  # as every script does; common.exact_fp32 turns TF32 off for Inception
    s = sizes(cfg, cuda)
    train_dtype = 'bf16' if cuda else 'fp32'  # the trainers' default on each device
    name = torch.cuda.get_device_name(device) if cuda else f'CPU ({torch.get_num_threads()} threads)'
    print(f"{name} | torch {torch.__version__} | sizes: {'quick' if cfg.quick else device.type} | training {train_dtype} | "
          f"extraction and sampling bf16 and {'tf32' if cuda else 'fp32'} | Inception fp32 with TF32 off")
    ref = yardstick(device)
    unit, scale = ('TFLOP/s', 1e12) if cuda else ('GFLOP/s', 1e9)
    print(f"dense matmul {MATMUL_N[device.type]}^2: " + ', '.join(f'{k} {v / scale:.1f} {unit}' for k, v in ref.items()))

    rows = []
    for bench, mode, dtype, build in plan(device, train_dtype, compile_too=not (cfg.skip_compile or cfg.quick)):
        if cfg.only and bench not in cfg.only:
            continue
        print(f"{bench} ({mode}, {dtype})...", flush=True)
        rows.append(run_row(bench, mode, dtype, build, s, device, ref))
        if mode == 'compiled':
            torch._dynamo.reset()  # compiled code caches can keep the model alive
        gc.collect()  # this row's model goes before the next one is built
        if cuda:
            torch.cuda.empty_cache()

    print_table(rows, unit, scale, cuda)
    print_notes(s)
    if any(r['bench'] == 'autoencoders' for r in rows):
        print_autoencoder_ratios(rows, s)
    if cfg.json:
        fileio.write_json(cfg.json, {'device': name, 'torch': torch.__version__, 'sizes': s, 'matmul_flop_per_s': ref, 'rows': rows})
        print(f"wrote {cfg.json}")
    return rows


def run_row(bench, mode, dtype, build, s, device, ref):
    """Count the FLOPs on a one-image build (the math attention it needs would not fit at full size), then
    build, warm up, time; a compile failure or an out-of-memory becomes the row's error, not the run's end."""
    row = dict(bench=bench, mode=mode, dtype=dtype)
    cuda = device.type == 'cuda'
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        flops_per_image = count_flops(build(dict(s, **dict.fromkeys(BATCHES, 1)))[0])  # exact: FLOPs are linear in the batch
        step, images, size = build(s)
        flops = flops_per_image * images
        if bench == 'sample':  # one full sampling run is long enough (it warmed up on a short one)
            sec = seconds_per_call(step, 0, 1, device)
        else:  # the first compiled call compiles
            sec = seconds_per_call(step, s['warmup'] + (mode == 'compiled'), s['iters'], device)
        row.update(size=size, batch=images, img_per_s=images / sec, gflop_per_img=flops / images / 1e9,
                   flop_per_s=flops / sec, fraction=flops / sec / ref[dtype])
        if bench == 'sample':
            row['s_per_img_250'] = sec / images * sampler_forwards(FULL_STEPS) / sampler_forwards(s['steps'])
        if cuda:
            row['peak_gb'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    except Exception as e:
        lines = str(e).strip().splitlines()
        row['error'] = f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
        print(f"  failed: {row['error']}", flush=True)
    return row


def print_table(rows, unit, scale, cuda):
    header = ['benchmark', 'mode', 'dtype', 'size', 'batch', 'img/s', 'GFLOP/img', unit, '% of mm', f's/img@{FULL_STEPS}'] + (['peak GB'] if cuda else [])
    lines = [header]
    for r in rows:
        if 'error' in r:
            lines.append([r['bench'], r['mode'], r['dtype'], 'failed: ' + r['error'][:60]] + [''] * (len(header) - 4))
            continue
        lines.append([r['bench'], r['mode'], r['dtype'], r['size'], r['batch'], f"{r['img_per_s']:.4g}", f"{r['gflop_per_img']:.4g}",
                      f"{r['flop_per_s'] / scale:.4g}", f"{100 * r['fraction']:.1f}", f"{r['s_per_img_250']:.3g}" if 's_per_img_250' in r else '']
                     + ([f"{r['peak_gb']:.1f}"] if cuda else []))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    print()
    for line in lines:
        print('  '.join(str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))), flush=True)
    print()



def print_autoencoder_ratios(rows, s):
    """The VMAE against SD-VAE, as the paper's Table 2: parameters, GFLOPs (encode + decode), throughput."""
    by_mode = {r['mode']: r for r in rows if r['bench'] == 'autoencoders' and 'error' not in r}
    params = {who: sum(p.numel() for p in autoencoder(s[who], s['encode_px'], 'cpu').parameters()) for who in ('vmae', 'sdvae')}
    lines = [['', s['vmae'], s['sdvae'], 'VMAE / SD-VAE', 'paper'],
             ['parameters (M)', f"{params['vmae'] / 1e6:.2f}", f"{params['sdvae'] / 1e6:.2f}", f"{100 * params['vmae'] / params['sdvae']:.1f}%", '13.4%']]

    def add(label, modes, key, paper=''):
        if all(m in by_mode for who in ('vmae', 'sdvae') for m in modes[who]):
            v = {who: sum(by_mode[m][key] for m in modes[who]) for who in ('vmae', 'sdvae')}
            lines.append([label, f"{v['vmae']:.4g}", f"{v['sdvae']:.4g}", f"{100 * v['vmae'] / v['sdvae']:.1f}%", paper])
    both = {who: [f'{who} encode', f'{who} decode'] for who in ('vmae', 'sdvae')}
    add(f"GFLOP/img, encode + decode at {s['encode_px']} px", both, 'gflop_per_img', '4.1%')
    for part in ('encode', 'decode', 'train'):
        add(f'{part} img/s', {who: [f'{who} {part}'] for who in ('vmae', 'sdvae')}, 'img_per_s')
    add('train GFLOP/img (own objective)', {who: [f'{who} train'] for who in ('vmae', 'sdvae')}, 'gflop_per_img')
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    for line in lines:
        print('  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    print("(paper, Table 2: 37.5% of SD-VAE's training time, 9 h vs 24 h; here the per-image training step at the same size:\n"
          " a VMAE step / SD-VAE step time ratio is the inverse of the train img/s ratio)")


def print_notes(s):
    print(f"GFLOP/img: counted by PyTorch's FlopCounterMode on a one-image step: 2 per multiply-add of the matmuls, convs and attention;\n"
          f"a training step counts its forward and backward as they run (the images get no gradient: a hair under 3 x the forward).\n"
          f"Autoencoder training rows include LPIPS-VGG16 (2 feature passes and a backward to the reconstruction): vmae_train at\n"
          f"{s['train_px']} px, the autoencoders' at {s['encode_px']} px.\n"
          f"sample: {sampler_forwards(s['steps'])} DiT forwards per image for {s['steps']} steps, {sampler_forwards(FULL_STEPS)} for {FULL_STEPS} "
          f"(evaluations with t >= {CFG['cfg_interval_start']} are guided: batch 2N); s/img@{FULL_STEPS} scales the timed run by that ratio.\n"
          f"% of mm: achieved FLOP/s / dense matmul FLOP/s in the row's dtype (bf16 autocast rows: bf16; tf32 and fp32: fp32 matmuls).")

if __name__ == '__main__':
    with common.clear_errors():
        main()
