"""
Plumbing shared by the scripts: command-line config, torchrun/DDP set-up, precision, run
checkpoints for --resume, resumable sharded outputs, logging and one-line errors.

train_vmae.py, train_dit.py, sample.py, evaluate.py and bench.py all need these and must behave the
same (one flag spelling, multi-node device choice, resume, a NaN stop, what a bad path prints), so
they are written once here. The model files do not import this: they stay usable on their own. The
training step itself (autocast, accumulation, clipping, the optimizer step) is written out in each
trainer's loop, where a reader looks for it.
"""

import argparse
import ast
import contextlib
import ctypes
import dataclasses
import inspect
import json
import operator
import os
import re
import sys
import time
import types
import typing

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import fileio

# -----------------------------------------------------------------------------
# config: dataclass defaults <- config files <- --flags, the same for every script

def parse_config(config_cls, argv=None, description=None):
    """Build `config_cls` (a dataclass) from its defaults, then any config files given as positional
    arguments (plain `name = value` lines, parsed, never executed), then `--name value` flags.
    A config with positional fields (evaluate.py's ref and samples) takes those instead of config files."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, config_cls)
    return config_from_args(config_cls, parser.parse_args(argv), parser)


def add_config_arguments(parser, config_cls):
    """One flag per field: `--out_dir` (the documented spelling, as in the config files) and `--out-dir`.
    A bool takes `--name`, `--name false` or `--no_name`; a tuple takes one or more values (spaces or
    commas). The help text is the comment after the field in the dataclass."""
    comments = field_comments(config_cls)
    positional = [f for f in dataclasses.fields(config_cls) if f.metadata.get('positional')]
    if not positional:
        parser.add_argument('config_files', nargs='*', help='config files of `name = value` lines, applied before the flags')
    for f in dataclasses.fields(config_cls):
        kind, default = field_type(config_cls, f), f.default
        comment = comments.get(f.name, '').replace('%', '%%')  # argparse formats help with %
        help_text = comment if 'default' in comment else f"{comment} (default: {default!r})".strip()
        if f.metadata.get('positional'):
            parser.add_argument(f.name, type=kind, help=comments.get(f.name))
            continue
        names = {f.name, *f.metadata.get('aliases', ())}
        flags = sorted({'--' + n for n in names} | {'--' + n.replace('_', '-') for n in names}, key=lambda s: ('-' in s[2:], s))
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, type=parse_bool, nargs='?', const=True, default=None, help=help_text)
            parser.add_argument(f'--no_{f.name}', f'--no-{f.name.replace("_", "-")}', dest=f.name, action='store_const',
                                const=False, help=argparse.SUPPRESS)
        elif kind is tuple:
            parser.add_argument(*flags, dest=f.name, type=list_of(tuple_item_type(config_cls, f)), nargs='+', default=None,
                                help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, type=kind, default=None, help=help_text)


def config_from_args(config_cls, args, parser):
    values = {}
    for path in getattr(args, 'config_files', []):
        values.update(read_config_file(path, config_cls, parser))
    for name, value in vars(args).items():
        if name in {f.name for f in dataclasses.fields(config_cls)} and value is not None:
            values[name] = tuple(v for part in value for v in part) if isinstance(value, list) else value
    return dataclasses.replace(config_cls(), **values)


def field_type(config_cls, f):
    """int, float, bool, str or tuple, from the annotation (`float | None` counts as float)."""
    hint = typing.get_type_hints(config_cls)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(k for k in typing.get_args(hint) if k is not type(None))
    return typing.get_origin(hint) or hint


def tuple_item_type(config_cls, f):
    return typing.get_args(typing.get_type_hints(config_cls)[f.name])[0]


def list_of(kind):
    """argparse type: '1,2' -> [1, 2]; with nargs='+', `--eps 0 0.1` and `--eps 0,0.1` both work."""
    return lambda text: [kind(part) for part in text.split(',') if part]


def field_comments(config_cls):
    """{field: the comment after it} from the dataclass's source (and its bases'), the help of its flags."""
    comments = {}
    for cls in reversed(config_cls.__mro__):  # a subclass's comment wins
        if dataclasses.is_dataclass(cls):
            try:
                comments.update(re.findall(r'^\s+(\w+)\s*:[^#\n]*#\s*(.+)$', inspect.getsource(cls), flags=re.M))
            except (OSError, TypeError):  # no source (an interactive session): no help text
                pass
    return comments


def parse_bool(text):
    if text.lower() in ('1', 'true', 'yes', 'on'):
        return True
    if text.lower() in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'")


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
        kind = field_type(config_cls, fields[name])
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is tuple and isinstance(value, list):
            value = tuple(value)
        if type(value) is not kind and not (value is None and fields[name].default is None):
            parser.error(f"{path}:{node.lineno}: '{name}' must be {kind.__name__}, got {value!r}")
        values[name] = value
    return values


def positional():
    """A config field given as a positional argument (evaluate.py fid's REF and SAMPLES)."""
    return dataclasses.field(default='', metadata={'positional': True})


def aliases(default, *names):
    """A config field with extra flag names, e.g. sample.py's `classes` is also `--class`."""
    return dataclasses.field(default=default, metadata={'aliases': names})


LIMITS = {'at_least': (operator.ge, 'at least'), 'above': (operator.gt, 'greater than'), 'at_most': (operator.le, 'at most'),
          'below': (operator.lt, 'less than'), 'multiple_of': (lambda v, k: v % k == 0, 'a multiple of')}


def check_settings(cfg, choices=None, zero_ok=(), **limits):
    """Refuse settings that would run but make no sense (decoded noise, an empty batch, a crash later),
    before any work, with a ValueError naming the flag: `--steps must be at least 2, got 0`.
    limits: at_least, above, at_most, below, multiple_of = {field: number}; a tuple field must hold at
    least one value, and each must pass. choices: {field: allowed values} (each value of a tuple).
    zero_ok: fields whose 0 means 'the default' (skipped when 0). The config's --device, if it has one,
    must be a device PyTorch knows and, for cuda, one that is there."""
    for kind, bounds in limits.items():
        holds, words = LIMITS[kind]
        for name, bound in bounds.items():
            value = getattr(cfg, name)
            if name in zero_ok and value == 0:
                continue
            if value == ():
                raise ValueError(f"--{name} needs at least one value")
            for v in value if isinstance(value, tuple) else (value,):
                if not holds(v, bound):
                    default = ' (or 0 for the default)' if name in zero_ok else ''
                    hint = f": try {round(v / bound) * bound or bound}" if kind == 'multiple_of' else ''
                    raise ValueError(f"--{name} must be {words} {bound}{default}, got {v}{hint}")
    for name, allowed in (choices or {}).items():
        value = getattr(cfg, name)
        for v in value if isinstance(value, tuple) else (value,):
            if v not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(map(str, allowed))}, got '{v}'")
    device = getattr(cfg, 'device', 'auto')
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


def autocast(device, dtype):
    """bf16 / fp16 autocast on CUDA; fp32 (a no-op context) otherwise."""
    if device.type != 'cuda' or dtype == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast('cuda', dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[dtype])


def mixed_precision(device, dtype):
    """-> (autocast context, GradScaler) for training: fp16 needs its loss scaled, so its small gradients
    do not underflow; for bf16 and fp32 the scaler passes everything through unchanged."""
    return autocast(device, dtype), torch.amp.GradScaler(enabled=dtype == 'fp16' and device.type == 'cuda')


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
# checkpoints and logs

def run_checkpoint_path(out_dir, resume):
    """out_dir/last.pt, checked against --resume: resuming needs it, a fresh run must not overwrite it."""
    path = os.path.join(out_dir, 'last.pt')
    if resume and not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    if not resume and os.path.isfile(path):
        raise ValueError(f"{path} exists: pass --resume to continue that run, or choose another --out_dir")
    return path


def read_run_checkpoint(path, kind):
    """A training run's checkpoint for --resume; a checkpoint of another trainer, or weights without
    optimizer state, is refused before any work starts."""
    ckpt = fileio.read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get('kind') != kind or 'optimizer' not in ckpt:
        found = f"a '{ckpt['kind']}' checkpoint" if isinstance(ckpt, dict) and ckpt.get('kind', kind) != kind else \
            "not a training run's checkpoint (no optimizer state)"
        raise ValueError(f"--resume: {path} is {found}, and this run trains a '{kind}' model: choose the --out_dir of such a run "
                         f"(or the --model that made it)")
    return ckpt


def restore_run(ckpt, optimizer, scaler, cfg, path):
    """Optimizer state, loss scale and step from a run checkpoint (the caller loads the weights). -> step"""
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    print0(f"resumed from {path} at step {ckpt['step']}")
    note_config_changes(ckpt['config'], cfg)
    return ckpt['step']


def note_config_changes(saved, cfg, free=('resume', 'stop_epoch', 'max_steps', 'log_every', 'ckpt_every', 'keep_every', 'image_every',
                                          'sample_every', 'num_workers', 'compile', 'device', 'out_dir', 'autoencoder', 'latents')):
    """On resume, name the settings that differ from the checkpoint's run (other than the run's
    length and bookkeeping): the continuation is then no longer the run that was started."""
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items() if k not in free and k in saved and saved[k] != v]
    if changed:
        print0(f"note: resuming with changed settings: {', '.join(changed)}")


def save_run_checkpoint(ckpt, out_dir, step, keep_every):
    """Replace out_dir/last.pt; every keep_every steps also keep out_dir/ckpt_<step>.pt."""
    fileio.save_checkpoint(ckpt, os.path.join(out_dir, 'last.pt'))
    if keep_every and step % keep_every == 0:
        fileio.save_checkpoint(ckpt, os.path.join(out_dir, f'ckpt_{step:07d}.pt'))


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


def run_stage(title, script, flags):
    """For demo.py and study.py: run a training script (train_vmae, train_dit) with its config file and
    flags as its command line would, resuming (or skipping) what an earlier run finished."""
    print(f"\n== {title} ==")
    out_dir = flags[flags.index('--out_dir') + 1]
    if os.path.isfile(os.path.join(out_dir, 'last.pt')):
        flags = flags + ['--resume']
    print(f"$ python {script.__name__}.py {' '.join(flags)}")
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
