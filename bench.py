"""
Speed of nano-LDMAE's hot loops in one run: training steps of the VMAE (stage 1) and the DiT, eager
and compiled, latent extraction, CFG sampling and Inception features. Each row gives images/s and the
achieved FLOP/s as a fraction of this machine's dense matmul throughput, measured in the same run in
the row's precision, so that numbers from noisy or different machines compare.

FLOPs are counted analytically (the functions below): 2 per multiply-add of every Linear, conv and
attention matmul, per image; a training step is 3 x the forward (the backward computes gradients of
both activations and weights). Norms, activations and the optimizer step are timed but not counted;
data loading is neither (batches are synthetic and already on the device).

On a GPU: the paper's sizes in bf16 autocast; Inception in fp32 with TF32 off, as evaluate.py runs it.
(sample.py and train_dit.py's extraction run fp32 with TF32 today: --infer-dtype tf32 times that.)
On a CPU, fp32, and the batches, sampling steps and DiT latents shrink to finish in a few minutes.

$ python bench.py                              # everything: a few minutes, most of it compiling
$ python bench.py --quick                      # seconds: tiny models, no compile (a smoke test)
$ python bench.py --only dit_train --batch-size-dit-train 128 --json bench.json
"""

import argparse
import contextlib
import copy
import gc
import json
import time

import torch

import common
import dit
import evaluate
import vmae
from train_dit import update_ema

# -----------------------------------------------------------------------------
# sizes: per device kind; flags override

SIZES = {
    # VMAE stage 1 at 128 px; DiT-B/1 on 16x32x32 latents (64 per GPU: about 40 GB eager, where 128 would not fit
    # in 80 GB); extraction batch = train_dit's 64 images x (image + mirror); sampling as sample.py --batch-size 64
    'gpu': dict(vmae='VMAE-f8d16', dit='DiT-B/1', train_px=128, encode_px=256, latent=32, vmae_train=128, dit_train=64,
                encode=128, sample=64, inception=200, steps=250, warmup=3, iters=20),
    # the same models, small batches; DiT latents 16x16 (a quarter of the tokens: one DiT-B/1 step at 32x32 is ~30 s here)
    'cpu': dict(vmae='VMAE-f8d16', dit='DiT-B/1', train_px=128, encode_px=256, latent=16, vmae_train=2, dit_train=1,
                encode=2, sample=1, inception=2, steps=4, warmup=1, iters=2),
    'quick': dict(vmae='VMAE-tiny', dit='DiT-T/1', train_px=32, encode_px=64, latent=8, vmae_train=2, dit_train=2,
                  encode=2, sample=2, inception=1, steps=6, warmup=1, iters=1),
}
MASK_RATIO = 0.25                      # stage 1
CFG = dict(cfg_scale=10.0, cfg_interval_start=0.1, cfg_channels=3, shift=0.3)  # the paper's ImageNet sampler
MATMUL_N = {'cuda': 8192, 'cpu': 2048}  # big enough to reach the BLAS's best
FULL_STEPS = 250                       # seconds per image are also given for this many steps

# -----------------------------------------------------------------------------
# FLOPs per image. tests/test_bench.py checks them against torch's FlopCounterMode: equal for inference,
# training within 0.1% (nothing computes the gradient of the input images, which 3 x forward includes)

def linear(tokens, d_in, d_out):
    return 2 * tokens * d_in * d_out


def conv(hw, c_in, c_out, kh, kw=None):
    """A conv with a square hw x hw output."""
    return 2 * hw * hw * c_in * c_out * kh * (kw or kh)


def vit_block(tokens, dim, hidden):
    """qkv, proj and the two MLP matrices per token, plus attention: Q K^T and A V are T^2 D multiply-adds each."""
    return linear(tokens, dim, 3 * dim) + linear(tokens, dim, dim) + 2 * linear(tokens, dim, hidden) + 4 * tokens ** 2 * dim


def vmae_encode_flops(a, mask_ratio=0.0):
    """Patch embedding of all patches, then the blocks and to_latent on the visible ones."""
    n = (a['img_size'] // a['patch_size']) ** 2
    keep = int(n * (1 - mask_ratio))
    d = a['embed_dim']
    return (linear(n, 3 * a['patch_size'] ** 2, d) + a['depth'] * vit_block(keep, d, int(d * a['mlp_ratio']))
            + linear(keep, d, 2 * a['latent_dim']))


def vmae_decode_flops(a, mask_ratio=0.0):
    """from_latent and decoder_embed on the visible tokens, then the blocks and the pixel head on all of them,
    then the 3x3 RGB conv over the image."""
    n = (a['img_size'] // a['patch_size']) ** 2
    keep = int(n * (1 - mask_ratio))
    d = a['decoder_embed_dim']
    return (linear(keep, a['latent_dim'], d) + linear(keep, d, d) + a['decoder_depth'] * vit_block(n, d, int(d * a['mlp_ratio']))
            + linear(n, d, 3 * a['patch_size'] ** 2) + conv(a['img_size'], 3, 3, 3))


def lpips_vgg_flops(px):
    """One LPIPS-VGG16 feature pass: the 13 3x3 convs (up to relu5_3) and the 1x1 lin layers on the 5 feature maps."""
    layers = [(1, 3, 64), (1, 64, 64), (2, 64, 128), (2, 128, 128), (4, 128, 256), (4, 256, 256), (4, 256, 256),
              (8, 256, 512), (8, 512, 512), (8, 512, 512), (16, 512, 512), (16, 512, 512), (16, 512, 512)]
    lins = [(1, 64), (2, 128), (4, 256), (8, 512), (16, 512)]
    return sum(conv(px // s, c_in, c_out, 3) for s, c_in, c_out in layers) + sum(conv(px // s, c, 1, 1) for s, c in lins)


def vmae_train_flops(a, mask_ratio):
    """3 x the VMAE forward, plus LPIPS: VGG runs on the reconstruction and on the target (2 passes) and the
    backward reaches the reconstruction only, with the VGG frozen: input gradients, ~1 more pass. 3 passes."""
    return 3 * (vmae_encode_flops(a, mask_ratio) + vmae_decode_flops(a, mask_ratio)) + 3 * lpips_vgg_flops(a['img_size'])


def dit_forward_flops(a):
    """Patch embedding, timestep MLP, per block the attention and SwiGLU (or GELU MLP) on every token plus the
    adaLN linear (D -> 6D, once per image), and the final layer."""
    t, d, p, c = (a['input_size'] // a['patch_size']) ** 2, a['hidden_size'], a['patch_size'], a['in_channels']
    hidden = int(d * a['mlp_ratio'])
    mlp = 3 * linear(t, d, int(2 / 3 * hidden)) if a['use_swiglu'] else 2 * linear(t, d, hidden)  # SwiGLU: w12 (D -> 2H), w3
    block = linear(t, d, 3 * d) + linear(t, d, d) + 4 * t ** 2 * d + mlp + linear(1, d, 6 * d)
    return (linear(t, c * p * p, d) + linear(1, 256, d) + linear(1, d, d) + a['depth'] * block
            + linear(1, d, 2 * d) + linear(t, d, p * p * c))


def sampler_forwards(steps):
    """DiT forwards per image in euler_sample: steps - 1 evaluations; those with t >= the interval start run
    the conditional and unconditional velocity in one batch of 2N."""
    t = dit.timestep_grid(steps, CFG['shift'])[:-1]
    return len(t) + int((t >= CFG['cfg_interval_start']).sum())


def inception_flops():
    """FID Inception-v3 at 299x299: every conv (BN, ReLU, pools and the resize are elementwise) and the fc.
    11.4 GFLOPs: the 5.7 G multiply-adds usually quoted as Inception-v3's "5.7 GFLOPs"."""
    f = conv(149, 3, 32, 3) + conv(147, 32, 32, 3) + conv(147, 32, 64, 3) + conv(73, 64, 80, 1) + conv(71, 80, 192, 3)
    for c_in, pool in ((192, 32), (256, 64), (288, 64)):  # Mixed_5b-d, 35x35: the four branches' 1x1s, then 5x5, 3x3, 3x3
        f += conv(35, c_in, 64 + 48 + 64 + pool, 1) + conv(35, 48, 64, 5) + conv(35, 64, 96, 3) + conv(35, 96, 96, 3)
    f += conv(17, 288, 384, 3) + conv(35, 288, 64, 1) + conv(35, 64, 96, 3) + conv(17, 96, 96, 3)  # Mixed_6a
    for c7 in (128, 160, 160, 192):  # Mixed_6b-e, 17x17: 1x1s, then six 1x7/7x1 convs (four c7 -> c7, two c7 -> 192)
        f += conv(17, 768, 192 + c7 + c7 + 192, 1) + 4 * conv(17, c7, c7, 1, 7) + 2 * conv(17, c7, 192, 1, 7)
    f += conv(17, 768, 384, 1) + conv(8, 192, 320, 3) + 2 * conv(17, 192, 192, 1, 7) + conv(8, 192, 192, 3)  # Mixed_7a
    for c_in in (1280, 2048):  # Mixed_7b-c, 8x8: 1x1s, four 1x3/3x1 convs 384 -> 384, one 3x3 448 -> 384
        f += conv(8, c_in, 320 + 384 + 448 + 192, 1) + 4 * conv(8, 384, 384, 1, 3) + conv(8, 448, 384, 3)
    return f + linear(1, 2048, 1008)

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
        return evaluate.exact_fp32()
    return torch.autocast('cuda', dtype=torch.bfloat16) if kind == 'bf16' else contextlib.nullcontext()

# -----------------------------------------------------------------------------
# the benchmarks: each returns (function for one batch, images per batch, FLOPs per batch, size text)

def randomise_zero_init(model):
    """adaLN-Zero and the zeroed output layer would make the DiT's backward multiply zeros, which GPUs do
    faster than real data (less power, higher clocks): small random values instead."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(std=0.02)
    return model


def vmae_train(s, device, dtype, compiled):
    model = vmae.VMAE_models[s['vmae']](img_size=s['train_px']).to(device)
    perceptual = vmae.lpips_vgg(pretrained=False).to(device)  # random VGG: the same FLOPs, no download
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == 'cuda')
    train_model = torch.compile(model) if compiled else model  # as train_vmae.py: the model, not LPIPS
    x = torch.rand(s['vmae_train'], 3, s['train_px'], s['train_px'], device=device) * 2 - 1
    weights = vmae.LossWeights()

    def step():
        with precision(dtype):
            recon, mask, posterior = train_model(x, mask_ratio=MASK_RATIO, sample_posterior=True)
            loss, _ = vmae.vmae_loss(x, recon, mask, posterior, model.patch_size, weights, perceptual)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    size = f"{s['vmae']} {s['train_px']}px mask {MASK_RATIO} +LPIPS"
    return step, len(x), len(x) * vmae_train_flops(model.args, MASK_RATIO), size


def dit_train(s, device, dtype, compiled):
    model = randomise_zero_init(dit.DiT_models[s['dit']](input_size=s['latent'])).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == 'cuda')
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
        update_ema(ema, model, 0.9999)
    size = f"{s['dit']} {model.in_channels}x{s['latent']}x{s['latent']}"
    return step, len(y), len(y) * 3 * dit_forward_flops(model.model_args), size


def vmae_encode(s, device, dtype):
    model = vmae.VMAE_models[s['vmae']](img_size=s['encode_px']).to(device).eval()
    x = torch.rand(s['encode'], 3, s['encode_px'], s['encode_px'], device=device) * 2 - 1

    @torch.no_grad()
    def step():
        with precision(dtype):
            model.encode(x)
    return step, len(x), len(x) * vmae_encode_flops(model.args), f"{s['vmae']} {s['encode_px']}px"


def dit_sample(s, device, dtype):
    """The Euler/CFG loop alone: sample.py's one VMAE decode per image adds ~0.02% of the FLOPs."""
    model = randomise_zero_init(dit.DiT_models[s['dit']](input_size=s['latent'])).to(device).eval()
    z = torch.randn(s['sample'], model.in_channels, s['latent'], s['latent'], device=device)
    y = torch.randint(0, model.num_classes, (len(z),), device=device)

    def step(steps=s['steps']):
        with precision(dtype):
            dit.euler_sample(model, z, y, steps=steps, **CFG)
    step(3)  # the warm-up, short: 3 grid points = an unguided evaluation (batch N) and a guided one (2N)
    size = f"{s['dit']} {model.in_channels}x{s['latent']}x{s['latent']} {s['steps']} steps cfg {CFG['cfg_scale']:g} ch{CFG['cfg_channels']}"
    return step, len(z), len(z) * sampler_forwards(s['steps']) * dit_forward_flops(model.model_args), size


def inception(s, device, dtype):
    model = evaluate.FIDInceptionV3().to(device).eval().requires_grad_(False)
    images = torch.randint(0, 256, (s['inception'], 3, 256, 256), dtype=torch.uint8, device=device)  # ADM npz samples

    @torch.no_grad()
    def step():
        with precision(dtype):
            model(images)  # resized to 299 inside: timed, its FLOPs not counted
    return step, len(images), len(images) * inception_flops(), 'FID Inception-v3 256->299px'

# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--quick', action='store_true', help='tiny models and batches, no compile: a smoke test in seconds')
    p.add_argument('--skip-compile', action='store_true', help='only eager training steps')
    p.add_argument('--only', default='', help='comma-separated subset of: vmae_train, dit_train, encode, sample, inception')
    p.add_argument('--device', default='auto', help="'auto', 'cuda' or 'cpu'")
    p.add_argument('--infer-dtype', choices=['bf16', 'tf32'], default='bf16',
                   help='extraction and sampling on a GPU: bf16 autocast, or fp32 with TF32 (what sample.py and train_dit.py run today)')
    for name in ('vmae_train', 'dit_train', 'encode', 'sample', 'inception'):
        p.add_argument(f"--batch-size-{name.replace('_', '-')}", type=int, default=0, dest=name, metavar='N', help='0: the default for the device')
    p.add_argument('--sample-steps', type=int, default=0, dest='steps', metavar='N', help='Euler grid points (0: 250 on a GPU, 4 on a CPU)')
    p.add_argument('--json', default='', help='also write the results here')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device if args.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu')
    cuda = device.type == 'cuda'
    common.enable_tf32()  # as every script does; evaluate.exact_fp32 turns it off for Inception
    s = dict(SIZES['quick' if args.quick else 'gpu' if cuda else 'cpu'])
    s.update({k: v for k, v in vars(args).items() if k in s and v})
    train_dtype, infer_dtype = ('bf16', args.infer_dtype) if cuda else ('fp32', 'fp32')  # autocast is CUDA-only here
    name = torch.cuda.get_device_name(device) if cuda else f'CPU ({torch.get_num_threads()} threads)'
    print(f"{name} | torch {torch.__version__} | sizes: {'quick' if args.quick else device.type} | training {train_dtype} | "
          f"extraction and sampling {infer_dtype} | Inception fp32 with TF32 off")

    # the yardstick, in each precision a row can use
    ref = {}
    for kind in (['bf16', 'tf32', 'fp32'] if cuda else ['fp32']):
        with precision(kind):
            ref[kind] = matmul_flops_per_s(MATMUL_N[device.type], torch.bfloat16 if kind == 'bf16' else torch.float32, device)
    unit, scale = ('TFLOP/s', 1e12) if cuda else ('GFLOP/s', 1e9)
    print(f"dense matmul {MATMUL_N[device.type]}^2: " + ', '.join(f'{k} {v / scale:.1f} {unit}' for k, v in ref.items()))

    compile_too = not (args.skip_compile or args.quick)
    plan = [('vmae_train', 'eager', train_dtype, lambda: vmae_train(s, device, train_dtype, compiled=False)),
            ('vmae_train', 'compiled', train_dtype, lambda: vmae_train(s, device, train_dtype, compiled=True)),
            ('dit_train', 'eager', train_dtype, lambda: dit_train(s, device, train_dtype, compiled=False)),
            ('dit_train', 'compiled', train_dtype, lambda: dit_train(s, device, train_dtype, compiled=True)),
            ('encode', 'eager', infer_dtype, lambda: vmae_encode(s, device, infer_dtype)),
            ('sample', 'eager', infer_dtype, lambda: dit_sample(s, device, infer_dtype)),
            ('inception', 'eager', 'fp32', lambda: inception(s, device, 'fp32'))]
    only = set(filter(None, args.only.split(',')))
    if only - {p[0] for p in plan}:
        raise SystemExit(f"--only: unknown {sorted(only - {p[0] for p in plan})}; choose from vmae_train, dit_train, encode, sample, inception")
    rows = []
    for bench, mode, dtype, build in plan:
        if (only and bench not in only) or (mode == 'compiled' and not compile_too):
            continue
        print(f"{bench} ({mode}, {dtype})...", flush=True)
        rows.append(run_row(bench, mode, dtype, build, s, device, ref))
        if mode == 'compiled':
            torch._dynamo.reset()  # compiled code caches can keep the model alive
        gc.collect()  # this row's model goes before the next one is built
        if cuda:
            torch.cuda.empty_cache()

    print_table(rows, unit, scale, cuda)
    print(f"GFLOP/img: 2 per multiply-add of the Linears, convs and attention matmuls; a training step is 3 x the forward.\n"
          f"vmae_train includes LPIPS-VGG16 at {s['train_px']} px: 2 feature passes + a backward to the input only, counted as 3 passes.\n"
          f"sample: {sampler_forwards(s['steps'])} DiT forwards per image for {s['steps']} steps, {sampler_forwards(FULL_STEPS)} for {FULL_STEPS} "
          f"(evaluations with t >= {CFG['cfg_interval_start']} are guided: batch 2N); s/img@{FULL_STEPS} scales the timed run by that ratio.\n"
          f"% of mm: achieved FLOP/s / dense matmul FLOP/s in the row's dtype (bf16 autocast rows: bf16; tf32 and fp32: fp32 matmuls).")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'device': name, 'torch': torch.__version__, 'sizes': s, 'matmul_flop_per_s': ref, 'rows': rows}, f, indent=2)
        print(f"wrote {args.json}")
    return rows


def run_row(bench, mode, dtype, build, s, device, ref):
    """Build, warm up, time; a compile failure or an out-of-memory becomes the row's error, not the run's end."""
    row = dict(bench=bench, mode=mode, dtype=dtype)
    cuda = device.type == 'cuda'
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step, images, flops, size = build()
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


if __name__ == '__main__':
    main()
