# A small DiT on the built-in dataset's latents (VMAE-small, 32 px -> 16 x 4 x 4): minutes on a laptop CPU.
data = 'builtin'
image_size = 32
out_dir = 'out/dit_small'
model = 'DiT-S/1'
batch_size = 128
micro_batch_size = 128
lr = 1e-3
ema_decay = 0.999       # a short run needs a short EMA
max_steps = 1500
dtype = 'fp32'
num_workers = 1
log_every = 100
ckpt_every = 500
keep_every = 0
sample_every = 500
