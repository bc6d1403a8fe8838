"""
Reading and writing files safely: the one small module the model files may share.

- `read_checkpoint`: torch.load that never runs code from the file, with one-line errors;
- `atomic_write` (and `save_checkpoint`, `write_json`): write to a temporary file, then rename, so a
  crash mid-write never destroys the last good file;
- `strip_wrapper_prefixes`: state-dict keys without DDP's 'module.' or torch.compile's '_orig_mod.';
- `file_sha256`: ties latents and DiTs to the exact autoencoder weights, and identifies Inception weights;
- `check_output_file`, `check_output_dir`: an output path that cannot be written is refused before the work.

It imports nothing of the project, so vmae.py, dit.py and inception.py stay usable on their own.
"""

import argparse
import contextlib
import hashlib
import json
import os

import torch


def read_checkpoint(path, what='checkpoint'):
    """torch.load(weights_only=True): only tensors and plain containers are unpickled, no code runs.
    The authors' files also hold an argparse.Namespace of their training arguments, allowed as plain data.
    A missing file is a FileNotFoundError, an unreadable one a ValueError, each one line naming `what`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean: not a checkpoint we can read safely
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        raise ValueError(f"'{path}' is not a PyTorch checkpoint this project can read safely (expected a {what}; "
                         f"torch.load(weights_only=True) cannot read it: {reason})") from None


@contextlib.contextmanager
def atomic_write(path, mode='wb'):
    """Yields a file opened on `<path>.tmp`; once the block ends without error the file is flushed to
    disk and renamed over `path` (a rename is atomic), otherwise it is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp'
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(obj, path):
    with atomic_write(path) as f:
        torch.save(obj, f)


def write_json(path, obj):
    with atomic_write(path, 'w') as f:
        json.dump(obj, f, indent=1)


def strip_wrapper_prefixes(state_dict):
    """Drops the 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes that wrapped models add to keys."""
    def clean(key):
        while key.startswith(('module.', '_orig_mod.')):
            key = key.split('.', 1)[1]
        return key
    return {clean(key): value for key, value in state_dict.items()}


def file_sha256(path):
    """The SHA-256 of a file, hex; of a folder (a diffusers vae/), of its files' relative names and hashes."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, _, files in sorted(os.walk(path)):
            for name in sorted(files):
                h.update(f'{os.path.relpath(os.path.join(root, name), path)}:{file_sha256(os.path.join(root, name))}\n'.encode())
        return h.hexdigest()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def blocking_file(path):
    """The nearest existing ancestor of `path` that is a file rather than a folder, or None."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else parent


def check_output_file(path, flag='--out', extensions=()):
    """Refuse, before any work, an output file that could not be written: an existing folder, a file in
    the way of its folder, or (where `extensions` are given) an ending the writer does not know."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder: give a file name inside it")
    if extensions and not path.lower().endswith(tuple(extensions)):
        raise ValueError(f"{flag} {path} must end in {' or '.join(extensions)}")
    if blocking_file(path):
        raise ValueError(f"{flag} {path} cannot be written: {blocking_file(path)} is a file, not a folder")


def check_output_dir(path, flag='--out_dir'):
    """Refuse, before any work, an output folder that could not be made: a file at its place or above it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a folder: choose another {flag}")
    if blocking_file(os.path.join(path, 'x')):
        raise ValueError(f"{flag} {path} cannot be made: {blocking_file(os.path.join(path, 'x'))} is a file, not a folder")
