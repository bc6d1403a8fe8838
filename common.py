"""
Plumbing shared by the scripts: command-line config, torchrun/DDP set-up, precision, what the
trainers share (the weight check on resume, AdamW's groups, the cosine schedule), resumable sharded
outputs, logging and one-line errors.

train_vmae.py, train_dit.py, sample.py, evaluate.py and bench.py all need these and must behave the
same (one flag spelling, multi-node device choice, resume, a NaN stop, what a bad path prints), so
they are written once here. The model files do not import this: they stay usable on their own. The
training step itself (autocast, accumulation, clipping, the optimizer step) and the checkpoint dict and
resume are written out in each trainer, where a reader looks for them.
"""

import argparse
import ast
import contextlib
import ctypes
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time
import typing

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import fileio

# -----------------------------------------------------------------------------
# config: dataclass defaults <- config files <- --flags, the same for every script

def parse_config(config_cls, argv=None, description=None):
    """Build `config_cls` (a dataclass) from its defaults, then the config files given as positional
    arguments (`name = value` lines, parsed, never executed), then `--name value` flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config_files', nargs='*', help='files of `name = value` lines, applied before the flags')
    add_flags(parser, config_cls)
    args = vars(parser.parse_args(argv))
    values = {}
    for path in args.pop('config_files'):
        values.update(read_config_file(path, config_cls, parser))
    values.update({name: tuple(v) if isinstance(v, list) else v for name, v in args.items() if v is not None})
    return config_cls(**values)


def add_flags(parser, config_cls):
    """One `--name` per field (`--class` for sample.py's `classes`), its help the comment after the field:
    a bool takes true or false (alone: true), a tuple one or more values. Positional fields take no flag."""
    comments = dict(re.findall(r'^ +(\w+):[^#\n]*# *(.+)$', inspect.getsource(config_cls), flags=re.M))
    for f in dataclasses.fields(config_cls):
        kind, item = field_type(config_cls, f.name)
        names = [f.name] if f.metadata.get('positional') else [f"--{f.metadata.get('flag', f.name)}"]
        options = dict(dest=f.name, default=None, help=f"{comments.get(f.name, '')} (default: {f.default!r})".replace('%', '%%'))
        if f.metadata.get('positional'):
            options = dict(help=comments.get(f.name))
        elif kind is bool:
            options.update(type=parse_bool, nargs='?', const=True)
        elif kind is tuple:
            options.update(type=item, nargs='+')
        parser.add_argument(*names, **options, **({} if kind in (bool, tuple) else {'type': kind}))


def field_type(config_cls, name):
    """(int, float, bool, str or tuple; a tuple's item type): `float | None` counts as float."""
    hint = typing.get_type_hints(config_cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return tuple, args[0]
    return (args[0] if args else hint), None


def parse_bool(text):
    if text.lower() not in ('true', 'false'):
        raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")
    return text.lower() == 'true'


def read_config_file(path, config_cls, parser):
    """`name = literal` assignments -> dict, checked against the dataclass's names and types."""
    if not os.path.isfile(path):
        parser.error(f"config file '{path}' not found")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values = {}
    for node in ast.parse(open(path).read(), filename=path).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            parser.error(f"{path}:{node.lineno}: only `name = value` lines are allowed in a config file")
        name = node.targets[0].id
        if name not in fields:
            parser.error(f"{path}:{node.lineno}: unknown setting '{name}'")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            parser.error(f"{path}:{node.lineno}: the value of '{name}' must be a literal")
        kind, _ = field_type(config_cls, name)
        value = float(value) if kind is float and type(value) is int else tuple(value) if kind is tuple and isinstance(value, list) else value
        if type(value) is not kind and not (value is None and fields[name].default is None):
            parser.error(f"{path}:{node.lineno}: '{name}' must be {kind.__name__}, got {value!r}")
        values[name] = value
    return values


def parse_command(commands, argv, prog, description):
    """`prog COMMAND [args]` with commands = {name: (its Config dataclass, one line of help)}. -> (name, config)"""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='{' + ','.join(commands) + '}')
    if argv and argv[0] not in commands and not argv[0].startswith('-'):
        raise ValueError(f"unknown command '{argv[0]}': choose one of {', '.join(commands)}")
    for name, (config_cls, help_text) in commands.items():
        add_flags(subparsers.add_parser(name, help=help_text, description=help_text), config_cls)
    args = vars(parser.parse_args(argv))
    name = args.pop('command')
    return name, commands[name][0](**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None})


def positional():
    """A config field given as a positional argument (evaluate.py fid's REF and SAMPLES)."""
    return dataclasses.field(default='', metadata={'positional': True})


def check_device(device):
    """--device: auto, cpu, cuda or cuda:N, and for cuda one that is there."""
    try:
        cuda = device != 'auto' and torch.device(device).type == 'cuda'
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got '{device}'") from None
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: PyTorch sees no CUDA GPU here: use --device cpu (or auto)")


# -----------------------------------------------------------------------------
# devices, DDP and precision

@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def master(self):
        return self.rank == 0

    @property
    def ddp(self):
        return self.world_size > 1


def setup_distributed(device='auto'):
    """One process (python script.py) or torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE):
    the GPU is cuda:LOCAL_RANK, so multi-node runs pick the right device; NCCL on GPUs, gloo on CPU."""
    cuda = torch.cuda.is_available() if device == 'auto' else device.startswith('cuda')
    if 'RANK' not in os.environ:
        return Dist(device=torch.device(device if device != 'auto' else 'cuda' if cuda else 'cpu'))
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    dev = torch.device(f'cuda:{local_rank}' if cuda else 'cpu')
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group('nccl' if cuda else 'gloo')
    return Dist(rank, local_rank, world_size, dev)


def cleanup_distributed():
    """Every rank waits for the others (rank 0 may still be writing) before the group is torn down:
    a rank that destroys its gloo group while a peer is busy can abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_bounds(n, rank, world_size):
    """Contiguous shard [start, stop) of rank: concatenating the shards in rank order gives the input order."""
    return n * rank // world_size, n * (rank + 1) // world_size


def gather_shards(x, n, d):
    """Every rank's shard of an (n, ...) CPU tensor, concatenated in rank order (exactly n rows, input
    order), on the CPU of every rank."""
    if not d.ddp:
        return x
    sizes = [stop - start for start, stop in (shard_bounds(n, r, d.world_size) for r in range(d.world_size))]
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=d.device)  # all_gather needs equal shapes
    padded[:len(x)] = x.to(d.device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()


def seed_for(*numbers):
    """A well-mixed 63-bit seed from integers, e.g. (seed, rank, step)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seeded_noise(seed, indices, shape):
    """One N(0, I) draw of `shape` per item, seeded by (seed, item index): the same noise whatever the
    batch size or the number of ranks (sampling, the smoothness analysis)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(seed, int(i)))) for i in indices])


def resolve_dtype(dtype, device):
    """--dtype: '' is bf16 on a GPU and fp32 on a CPU; bf16 runs on either, fp16 only on CUDA (where its loss
    scaling works). Settled right after set-up, before any work."""
    dtype = dtype or ('bf16' if device.type == 'cuda' else 'fp32')
    if dtype == 'fp16' and device.type != 'cuda':
        raise ValueError("--dtype fp16 needs a CUDA GPU: use bf16 or fp32 on a CPU")
    return dtype


def autocast(device, dtype):
    """bf16 / fp16 autocast on the device (dtype from resolve_dtype); fp32 is a no-op context."""
    if dtype == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[dtype])


def mixed_precision(device, dtype):
    """-> (autocast context, GradScaler) for training: fp16 needs its loss scaled, so its small gradients
    do not underflow; for bf16 and fp32 the scaler passes everything through unchanged."""
    return autocast(device, dtype), torch.amp.GradScaler(enabled=dtype == 'fp16')


def speed_settings():
    """What every script sets before work: TF32 matmuls and convolutions on CUDA, and freed CPU memory kept
    for reuse (keep_freed_memory)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    keep_freed_memory()


def keep_freed_memory():
    """Tell glibc's malloc to keep freed memory in the process. By default it hands large freed blocks back
    to the OS, and the next step's tensors then fault in fresh zeroed pages, 4 KiB at a time: an eager
    DiT-B/1 training step on a 2-core CPU ran about 8% slower for it (GPU memory is unaffected). Blocks
    up to 32 MiB (glibc's largest setting) now come from the heap and the heap is never trimmed, so the
    process keeps its peak memory, which a training loop reuses every step. Other C libraries: nothing."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the top of the heap back
    libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB from the heap, not fresh mappings


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for matmuls and cuDNN convolutions (PyTorch leaves cuDNN's on by default), so evaluation
    features and distances do not depend on the GPU generation."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def all_reduce_mean(x):
    """Mean of a tensor over ranks (a copy of it without DDP)."""
    x = x.clone()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def accumulation_steps(batch_size, micro_batch_size, d):
    """Micro-batches per optimizer step, so that `batch_size` is the global batch whatever the number of
    ranks: a run on 1 GPU and one on 64 take the same steps."""
    per_step = micro_batch_size * d.world_size
    if micro_batch_size < 1 or batch_size < 1 or batch_size % per_step:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of micro_batch_size x ranks = {per_step}")
    return batch_size // per_step


def wrap_for_training(model, compile, d):
    """torch.compile, then DDP (in that order, as PyTorch recommends). The returned module is for the
    forward/backward; checkpoints save the plain `model`, so they carry no wrapper prefixes."""
    if compile:
        print0("compiling the model (takes a minute)...")
        model = torch.compile(model)
    if d.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == 'cuda' else None)
    return model


# -----------------------------------------------------------------------------
# what the trainers share; resumable outputs; logs

def note_config_changes(saved, cfg, free=('resume', 'stop_epoch', 'max_steps', 'log_every', 'ckpt_every', 'keep_every', 'image_every',
                                          'sample_every', 'num_workers', 'compile', 'device', 'out_dir', 'autoencoder', 'latents')):
    """On resume, name the settings that differ from the checkpoint's run (other than the run's
    length and bookkeeping): the continuation is then no longer the run that was started."""
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items() if k not in free and k in saved and saved[k] != v]
    if changed:
        print0(f"note: resuming with changed settings: {', '.join(changed)}")


def load_checked(model, weights, source, model_name):
    """model.load_weights, with weights of another shape refused in one line (load_state_dict's own error
    lists every tensor). Position tables are left out: load_weights resizes them to the image size."""
    theirs = fileio.strip_wrapper_prefixes(weights)
    differ = [f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in model.state_dict().items()
              if k in theirs and theirs[k].shape != v.shape and not k.endswith('pos_embed')]
    if differ:
        raise ValueError(f"{source} holds weights of another shape than --model {model_name} ({len(differ)} tensors differ, "
                         f"e.g. {differ[0]}): pass the --model that made it")
    model.load_weights(weights)


def adamw(model, lr, betas, weight_decay):
    """AdamW with weight decay on weight matrices (and the mask token) only, as timm's
    param_groups_weight_decay that the authors used; frozen tensors are left out. Fused: one pass over each
    tensor without temporaries (on a CPU the default per-tensor loop takes several times longer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def cosine_lr(step, lr, min_lr, warmup_steps, total_steps):
    """Linear warm-up from 0, then a half-cycle cosine to min_lr at the end of the schedule."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_same_settings(recorded, wanted, what, remedy):
    """Refuse to continue or reuse `what` (an output made with `recorded` settings) under other settings,
    which would mix two kinds of contents in one artefact: one line naming the first differing setting."""
    for name, value in wanted.items():
        if recorded.get(name) != value:
            raise ValueError(f"{what} was made with {name} {recorded.get(name)!r}, but this run has {name} {value!r}: {remedy}")


class ShardedArrays:
    """Arrays of `num_items` rows (memory-mapped `<folder>/<name>.npy`) filled batch by batch, the
    batches dealt round-robin to the ranks. Each row is marked in `<folder>/done.npy` only after it is
    flushed to disk, so a killed job restarts exactly where it stopped, with any batch size or number
    of ranks. `<folder>/settings.json` holds the settings that decide the rows' contents; reopening the
    folder with other settings is refused, so one output never mixes two. Used for latent extraction and
    for 50k-sample runs."""

    def __init__(self, folder, num_items, specs, settings, dist):
        """specs: {name: (row shape, dtype)}; settings: a JSON-able dict."""
        self.folder, self.num_items, self.dist = folder, num_items, dist
        layout = {f'{name}_rows': [list(shape), np.dtype(dtype).name] for name, (shape, dtype) in specs.items()}
        settings = json.loads(json.dumps({**settings, 'num_items': num_items, **layout}))  # as it reads back from JSON
        done_path, settings_path = os.path.join(folder, 'done.npy'), os.path.join(folder, 'settings.json')
        if dist.master and not os.path.isfile(done_path):  # done.npy is written last: without it, start afresh
            os.makedirs(folder, exist_ok=True)
            for name, (shape, dtype) in specs.items():
                np.lib.format.open_memmap(os.path.join(folder, f'{name}.npy'), 'w+', dtype, (num_items, *shape))
            fileio.write_json(settings_path, settings)
            np.save(done_path, np.zeros(num_items, dtype=bool))
        barrier()
        if not os.path.isfile(settings_path):
            raise ValueError(f"{folder} holds an unfinished output with no record of its settings (an older version's): "
                             f"delete it to start again")
        check_same_settings(json.load(open(settings_path)), settings, f"the unfinished output in {folder}",
                            f"rerun with the same settings to finish it, or delete {folder} to start again")
        self.arrays = {name: np.load(os.path.join(folder, f'{name}.npy'), mmap_mode='r+') for name in specs}
        self.done = np.load(done_path, mmap_mode='r+')

    def todo(self, batch_size):
        """This rank's batches of unfinished rows, as lists of row indices."""
        rows = np.flatnonzero(~self.done).tolist()
        batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        return batches[self.dist.rank::self.dist.world_size]

    def write(self, rows, **values):
        for name, v in values.items():
            self.arrays[name][rows] = v
            self.arrays[name].flush()
        self.done[rows] = True  # only now: the rows are on disk
        self.done.flush()

    def finish(self):
        """Wait for every rank; then True on rank 0 when all rows are done (False on the other ranks,
        which must not touch the files again: rank 0 may be packing and removing them)."""
        barrier()
        return self.dist.master and bool(np.load(os.path.join(self.folder, 'done.npy')).all())

    def remove(self, arrays=()):
        """Delete the bookkeeping (and the named arrays), and the folder once it is empty (rank 0, after finish)."""
        for name in ('done.npy', 'settings.json', *(f'{a}.npy' for a in arrays)):
            os.remove(os.path.join(self.folder, name))
        if not os.listdir(self.folder):
            os.rmdir(self.folder)


def barrier():
    if dist.is_initialized():
        dist.barrier()


class RunLog:
    """A progress bar; rank 0 prints the metrics it is given and appends them to
    `<out_dir>/log.jsonl`, with the images per second since the last such line."""

    def __init__(self, out_dir, master, start_step, total_steps):
        self.master, self.path = master, os.path.join(out_dir, 'log.jsonl')
        self.bar = None
        if master:
            os.makedirs(out_dir, exist_ok=True)
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, smoothing=0.1)
        self.images, self.since = 0, time.time()

    def step(self, images):
        self.images += images
        if self.bar:
            self.bar.update(1)

    def log(self, step, metrics):
        if self.images:
            metrics = {**metrics, 'img_per_s': self.images / (time.time() - self.since)}
            self.images, self.since = 0, time.time()
        if not self.master:
            return
        metrics = {'step': step, **{k: float(v) for k, v in metrics.items()}}
        if torch.cuda.is_available():
            metrics['peak_mem_gb'] = torch.cuda.max_memory_allocated() / 2 ** 30
        with open(self.path, 'a') as f:
            f.write(json.dumps(metrics) + '\n')
        self.bar.write(f"step {step}: " + ', '.join(f'{k} {v:.4g}' for k, v in metrics.items() if k != 'step'))

    def close(self):
        if self.bar:
            self.bar.close()


class Meter:
    """Sums scalar metrics on the device between log steps, so training never waits on a sync;
    `average()` means them over steps and ranks, and stops the run on a NaN/inf loss."""

    def __init__(self, names, device):
        self.names, self.device = list(names), device
        self.sums = torch.zeros(len(self.names) + 1, device=device)

    def add(self, values):
        self.sums += torch.stack([values[n].detach().float() if n in values else torch.zeros((), device=self.device)
                                  for n in self.names] + [torch.ones((), device=self.device)])

    def average(self, step, last_good):
        sums = all_reduce_mean(self.sums)  # every rank gets the same numbers, so every rank stops together
        self.sums.zero_()
        means = dict(zip(self.names, (sums[:-1] / sums[-1]).tolist()))
        if not np.isfinite(means[self.names[0]]):
            raise FloatingPointError(f"{self.names[0]} is {means[self.names[0]]} at step {step}: stopping; {last_good} still holds "
                                     f"the last good checkpoint (try a lower learning rate, --dtype fp32 or --grad_clip 1.0)")
        return means


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print('  '.join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))), flush=True)


def format_value(v):
    return 'n/a' if v is None else f'{v:.4f}'


def write_results(path, obj, cfg):
    """Results as JSON (atomically), with what produced them: the command's settings and torch's version."""
    fileio.write_json(path, {**obj, 'config': dataclasses.asdict(cfg), 'torch': torch.__version__})
    print(f"wrote {path}", flush=True)


def run_stage(title, script, flags):
    """For demo.py and study.py: run a training script (train_vmae, train_dit, paper.train_convae) with its config file and
    flags as its command line would, resuming (or skipping) what an earlier run finished."""
    print(f"\n== {title} ==")
    out_dir = flags[flags.index('--out_dir') + 1]
    if os.path.isfile(os.path.join(out_dir, 'last.pt')):
        flags = flags + ['--resume']
    runs = f"-m {script.__name__}" if '.' in script.__name__ else f"{script.__name__}.py"
    print(f"$ python {runs} {' '.join(flags)}")
    script.main(parse_config(script.Config, flags))


def print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


@contextlib.contextmanager
def clear_errors():
    """Inside this block, a missing file, bad input or a NaN stop (FileNotFoundError, ValueError,
    FloatingPointError) ends the script with its one-line message instead of a traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
